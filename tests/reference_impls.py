"""Independent, functional restatements of the reference forwards (rstrudel/segmenter, facebookresearch/dino),
written from their published semantics with plain torch ops: the oracles the model tests compare against.
They read a state dict by the references' key names, so they also check that ours loads without renaming."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def block(x, st, prefix, heads, eps):
    batch, count, dim = x.shape
    h = F.layer_norm(x, (dim,), st[f"{prefix}norm1.weight"], st[f"{prefix}norm1.bias"], eps)
    qkv = F.linear(h, st[f"{prefix}attn.qkv.weight"], st[f"{prefix}attn.qkv.bias"])
    q, k, v = qkv.reshape(batch, count, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5).softmax(dim=-1)
    h = (attn @ v).transpose(1, 2).reshape(batch, count, dim)
    x = x + F.linear(h, st[f"{prefix}attn.proj.weight"], st[f"{prefix}attn.proj.bias"])
    h = F.layer_norm(x, (dim,), st[f"{prefix}norm2.weight"], st[f"{prefix}norm2.bias"], eps)
    h = F.linear(F.gelu(F.linear(h, st[f"{prefix}mlp.fc1.weight"], st[f"{prefix}mlp.fc1.bias"])),
                 st[f"{prefix}mlp.fc2.weight"], st[f"{prefix}mlp.fc2.bias"])
    return x + h, attn


def patch_tokens(images, st, prefix, patch):
    x = F.conv2d(images, st[f"{prefix}patch_embed.proj.weight"], st[f"{prefix}patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    return torch.cat([st[f"{prefix}cls_token"].expand(x.shape[0], -1, -1), x], dim=1)


def segmenter_logits(st, images, patch, heads, decoder_heads, num_classes, depth=12):
    """Segmenter.forward: pad, ViT (LayerNorm eps 1e-5), decoder, bilinear upsampling, unpad."""
    height, width = images.shape[-2:]
    images = F.pad(images, (0, -width % patch, 0, -height % patch))
    gh, gw = images.shape[-2] // patch, images.shape[-1] // patch
    x = patch_tokens(images, st, "encoder.", patch)
    pos = st["encoder.pos_embed"]
    if x.shape[1] != pos.shape[1]:  # the reference's resize_pos_embed
        old = int(math.sqrt(pos.shape[1] - 1))
        grid = pos[0, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bilinear").permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        pos = torch.cat([pos[:, :1], grid], dim=1)
    x = x + pos
    for i in range(depth):
        x, _ = block(x, st, f"encoder.blocks.{i}.", heads, 1e-5)
    x = F.layer_norm(x, (x.shape[-1],), st["encoder.norm.weight"], st["encoder.norm.bias"], 1e-5)[:, 1:]
    if "decoder.head.weight" in st:
        masks = F.linear(x, st["decoder.head.weight"], st["decoder.head.bias"])
    else:
        x = F.linear(x, st["decoder.proj_dec.weight"], st["decoder.proj_dec.bias"])
        x = torch.cat([x, st["decoder.cls_emb"].expand(x.shape[0], -1, -1)], dim=1)
        for i in range(2):
            x, _ = block(x, st, f"decoder.blocks.{i}.", decoder_heads, 1e-5)
        x = F.layer_norm(x, (x.shape[-1],), st["decoder.decoder_norm.weight"], st["decoder.decoder_norm.bias"], 1e-5)
        patches, classes = x[:, :-num_classes] @ st["decoder.proj_patch"], x[:, -num_classes:] @ st["decoder.proj_classes"]
        patches = patches / patches.norm(dim=-1, keepdim=True)
        classes = classes / classes.norm(dim=-1, keepdim=True)
        masks = patches @ classes.transpose(1, 2)
        masks = F.layer_norm(masks, (num_classes,), st["decoder.mask_norm.weight"], st["decoder.mask_norm.bias"], 1e-5)
    masks = masks.transpose(1, 2).reshape(images.shape[0], num_classes, gh, gw)
    masks = F.interpolate(masks, size=images.shape[-2:], mode="bilinear")
    return masks[..., :height, :width]


def dino_forward(st, images, patch, heads, depth=12):
    """DINO VisionTransformer: (CLS feature after the final norm, last block's attention)."""
    batch, _, w, h = images.shape  # the reference's own naming: w is the height here
    x = patch_tokens(images, st, "", patch)
    pos = st["pos_embed"]
    npatch, n = x.shape[1] - 1, pos.shape[1] - 1
    if not (npatch == n and w == h):
        side = math.sqrt(n)
        w0, h0 = w // patch + 0.1, h // patch + 0.1
        grid = pos[:, 1:].reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=(w0 / side, h0 / side), mode="bicubic")
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], dim=1)
    x = x + pos
    attn = None
    for i in range(depth):
        x, attn = block(x, st, f"blocks.{i}.", heads, 1e-6)
    x = F.layer_norm(x, (x.shape[-1],), st["norm.weight"], st["norm.bias"], 1e-6)
    return x[:, 0], attn


def segm_inference(model, image, window, stride, label_size):
    """rstrudel/segmenter's single-scale evaluation of one normalised image (1, 3, H, W): segm/model/utils.py
    resize (short side up to the window only when smaller), sliding_window (anchors every stride, the last at
    the border), merge_windows (logits summed and divided by counts, bilinear to the label's size, softmax)."""
    height, width = image.shape[2:]
    if min(height, width) < window:
        if height < width:
            size = (window, int(width / height * window))
        else:
            size = (int(height / width * window), window)
        image = F.interpolate(image, size, mode="bilinear")
    height, width = image.shape[2:]
    h_anchors = [h for h in range(0, height, stride) if h < height - window] + [height - window]
    w_anchors = [w for w in range(0, width, stride) if w < width - window] + [width - window]
    logit = torch.zeros(model.config.num_classes, height, width)
    count = torch.zeros(1, height, width)
    for ha in h_anchors:
        for wa in w_anchors:
            logit[:, ha:ha + window, wa:wa + window] += model(image[:, :, ha:ha + window, wa:wa + window])[0]
            count[:, ha:ha + window, wa:wa + window] += 1
    logit = F.interpolate((logit / count)[None], label_size, mode="bilinear")[0]
    return F.softmax(logit, 0)


def dino_view_pillow(image, rng, size, scale, blur_p, solarize_p):
    """One DataAugmentationDINO view as main_dino.py computes it with torchvision on PIL images: Pillow's
    BICUBIC resize of the RandomResizedCrop box, mirror, ColorJitter through ImageEnhance and Pillow's HSV,
    greyscale, GaussianBlur, solarize; drawing from `rng` in shards.transforms.draw_view's order. H x W x 3."""
    import numpy as np
    from PIL import Image, ImageEnhance, ImageFilter, ImageOps

    from shards.transforms import random_resized_crop_box

    left, top, w, h = random_resized_crop_box(*image.size, scale, rng)
    view = image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
        view = ImageOps.mirror(view)
    if rng.random() < 0.8:
        factors = [rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4), rng.uniform(0.8, 1.2), rng.uniform(-0.1, 0.1)]
        for op in rng.permutation(4):
            if op == 0:
                view = ImageEnhance.Brightness(view).enhance(factors[0])
            elif op == 1:
                view = ImageEnhance.Contrast(view).enhance(factors[1])
            elif op == 2:
                view = ImageEnhance.Color(view).enhance(factors[2])
            else:
                hsv = np.asarray(view.convert("HSV")).copy()
                hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(factors[3] * 255)) % 256
                view = Image.fromarray(hsv, mode="HSV").convert("RGB")
    if rng.random() < 0.2:
        view = view.convert("L").convert("RGB")
    if rng.random() < blur_p:
        view = view.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    if rng.random() < solarize_p:
        view = ImageOps.solarize(view, threshold=128)
    return np.asarray(view)


def dino_multicrop_pillow(image, rng, global_size=224, local_size=96, local_crops=8):
    """DataAugmentationDINO's views of one image (dino_view_pillow), in the reference's order."""
    views = [dino_view_pillow(image, rng, global_size, (0.4, 1.0), 1.0, 0.0),
             dino_view_pillow(image, rng, global_size, (0.4, 1.0), 0.1, 0.2)]
    return views + [dino_view_pillow(image, rng, local_size, (0.05, 0.4), 0.5, 0.0) for _ in range(local_crops)]


def dino_colour_pillow(view, draws):
    """The photometric part of dino_view_pillow for given draws (shards.transforms.ViewDraws): ColorJitter's four
    ops through ImageEnhance and Pillow's HSV as torchvision runs them, greyscale, GaussianBlur, solarize."""
    import numpy as np
    from PIL import Image, ImageEnhance, ImageFilter, ImageOps

    if draws.jitter is not None:
        for op in draws.order:
            if op == 0:
                view = ImageEnhance.Brightness(view).enhance(draws.jitter[0])
            elif op == 1:
                view = ImageEnhance.Contrast(view).enhance(draws.jitter[1])
            elif op == 2:
                view = ImageEnhance.Color(view).enhance(draws.jitter[2])
            else:
                hsv = np.asarray(view.convert("HSV")).copy()
                hsv[..., 0] = (hsv[..., 0].astype(np.int32) + draws.jitter[3]) % 256
                view = Image.fromarray(hsv, mode="HSV").convert("RGB")
    if draws.grey:
        view = view.convert("L").convert("RGB")
    if draws.blur_sigma:
        view = view.filter(ImageFilter.GaussianBlur(radius=draws.blur_sigma))
    if draws.solarize:
        view = ImageOps.solarize(view, threshold=128)
    return np.asarray(view)
