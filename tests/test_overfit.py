"""A Segmenter-Tiny memorises four synthetic scenes: the encoder, decoder, upsampling and loss fit together."""

import numpy as np
import torch
import torch.nn.functional as F

import models
from shards.synth import class_ids, render_scene
from shards.transforms import IGNORE_INDEX, reduce_zero_label


def test_segmenter_tiny_overfits_four_images():
    torch.manual_seed(0)
    labels_in_use = class_ids(4)
    scenes = [render_scene(np.random.default_rng([5, i]), 96, 96, labels_in_use) for i in range(4)]
    images = torch.from_numpy(np.stack([s[0] for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    labels = torch.from_numpy(np.stack([reduce_zero_label(s[1]) for s in scenes])).long()
    model = models.create("segmenter_t16_mask", img_size=96, drop_path_rate=0.0, decoder_dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(60):
        loss = F.cross_entropy(model(images), labels, ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = model(images).argmax(1)
    valid = labels != IGNORE_INDEX
    accuracy = (predicted[valid] == labels[valid]).float().mean().item()
    assert accuracy > 0.9, f"pixel accuracy {accuracy:.3f} after 60 steps (loss {loss.item():.3f})"
