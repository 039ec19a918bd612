"""Each checkpoint format, written the way its project writes it, loads into the right model."""

import argparse
import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

import models
from models.pretrained import PretrainedError


@pytest.fixture(scope="module")
def dino_s16():
    torch.manual_seed(0)
    return models.create("dino_vits16", out_dim=128).eval()


def test_official_dino_backbone_file(dino_s16, tmp_path):
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(dino_s16.backbone.state_dict(), path)
    fresh = models.create("dino_vits16", pretrained=str(path), out_dim=128).eval()
    images = torch.randn(1, 3, 64, 64)
    assert torch.equal(fresh.backbone(images), dino_s16.backbone(images))


def test_full_dino_training_checkpoint_uses_the_teacher(dino_s16, tmp_path):
    """main_dino.py's save_dict: student (DDP: `module.` keys), teacher, optimizer, epoch, its argparse
    Namespace of arguments, and the loss's centre."""
    student = models.create("dino_vits16", out_dim=128)
    optimizer = torch.optim.AdamW(student.parameters())
    student(torch.randn(1, 3, 32, 32)).sum().backward()
    optimizer.step()
    args = argparse.Namespace(arch="vit_small", patch_size=16, out_dim=128, norm_last_layer=True, lr=0.0005,
                              global_crops_scale=(0.4, 1.0), data_path="/path/to/imagenet/train", output_dir=".")
    checkpoint = {
        "student": {f"module.{k}": v for k, v in student.state_dict().items()},
        "teacher": dino_s16.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": 3,
        "args": args,
        "dino_loss": {"center": torch.zeros(1, 128)},
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    loaded = models.create("dino_vits16", out_dim=128)
    report = models.load_pretrained(loaded, path)
    assert report.missing == [] and "teacher" in report.source
    for key, value in dino_s16.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_checkpoint_into_a_dino_backbone(tmp_path, suffix):
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=1000).eval()
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file(vit.state_dict(), str(path))
    else:
        torch.save(vit.state_dict(), path)
    loaded = models.create("dino_vits16", out_dim=128).eval()
    report = models.load_pretrained(loaded, path)
    assert sorted(report.unexpected) == ["backbone.head.bias", "backbone.head.weight"]
    images = torch.randn(1, 3, 224, 224)
    assert torch.allclose(loaded.backbone(images), vit.forward_features(images)[:, 0], atol=1e-5)


def test_official_segmenter_checkpoint(tmp_path):
    torch.manual_seed(0)
    original = models.create("segmenter_t16_mask").eval()
    state = dict(original.state_dict())
    state["encoder.head.weight"], state["encoder.head.bias"] = torch.zeros(1000, 192), torch.zeros(1000)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state, "optimizer": {}, "epoch": 64}, path)
    loaded = models.create("segmenter_t16_mask", pretrained=str(path)).eval()
    images = torch.randn(1, 3, 96, 80)
    assert torch.equal(loaded(images), original(images))


def test_dino_backbone_into_a_segmenter_encoder(dino_s16, tmp_path):
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(dino_s16.backbone.state_dict(), path)
    segmenter = models.create("segmenter_s16_mask")
    report = models.load_pretrained(segmenter, path)
    assert report.resized == ["encoder.pos_embed (1, 197, 384) -> (1, 1025, 384)"]
    assert report.missing and all(k.startswith("decoder.") for k in report.missing)
    assert torch.equal(segmenter.encoder.blocks[3].mlp.fc1.weight, dino_s16.backbone.blocks[3].mlp.fc1.weight)


def test_a_backbone_of_another_patch_size_is_refused(tmp_path):
    path = tmp_path / "vits8.pth"
    torch.save(models.create("dino_vits8", out_dim=64).backbone.state_dict(), path)
    with pytest.raises(PretrainedError, match=r"patch_embed.proj.weight has shape \(384, 3, 8, 8\)"):
        models.create("segmenter_s16_linear", pretrained=str(path))


def test_hub_names_need_a_cached_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(PretrainedError, match="dino_deitsmall8_pretrain.pth is not in the torch hub cache"):
        models.create("dino_vits8", pretrained="dino_vits8", out_dim=64)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(models.create("dino_vits8", out_dim=64).backbone.state_dict(),
               tmp_path / "hub" / "checkpoints" / "dino_deitsmall8_pretrain.pth")
    assert models.create("dino_vits8", pretrained="dino_vits8", out_dim=64) is not None


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_untrusted_pickles_are_not_executed(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": Payload()}, f)
    with pytest.raises(PretrainedError, match="not a readable checkpoint"):
        models.create("segmenter_t16_linear", pretrained=str(path))
    # The Namespace allowed for main_dino.py's `args` carries no code either.
    torch.save({"teacher": {}, "args": argparse.Namespace(hook=Payload())}, path)
    with pytest.raises(PretrainedError, match="not a readable checkpoint"):
        models.create("dino_vits16", pretrained=str(path))
    assert "code ran" not in capsys.readouterr().out


def test_missing_and_foreign_files_are_explained(tmp_path):
    with pytest.raises(PretrainedError, match="no such file"):
        models.create("wnet_tiny", pretrained=str(tmp_path / "nope.pth"))
    path = tmp_path / "other.pth"
    torch.save({"something.else": torch.zeros(3)}, path)
    with pytest.raises(PretrainedError, match="none of its 1 tensors"):
        models.create("wnet_tiny", pretrained=str(path))


def test_the_input_statistics_follow_the_weights(dino_s16, tmp_path):
    """segm's `normalization`: vit (mean = std = 0.5) for Google's ViT weights as timm serves them (with their
    classifier), ImageNet's for DeiT and DINO weights, and for no weights at all."""
    from models.pretrained import normalization_of

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict()
    save_file(vit, str(tmp_path / "vit_tiny_patch16_384.augreg_in21k_ft_in1k.safetensors"))
    torch.save(vit, tmp_path / "deit_tiny_patch16_224.pth")
    torch.save(dino_s16.backbone.state_dict(), tmp_path / "backbone.pth")
    torch.save({"teacher": {f"backbone.{k}": v for k, v in dino_s16.backbone.state_dict().items()}}, tmp_path / "ckpt.pth")
    assert normalization_of(tmp_path / "vit_tiny_patch16_384.augreg_in21k_ft_in1k.safetensors") == "vit"
    assert [normalization_of(tmp_path / name) for name in ("deit_tiny_patch16_224.pth", "backbone.pth", "ckpt.pth")] == ["imagenet"] * 3
    assert normalization_of(None) == normalization_of("dino_vits16") == "imagenet"
    segmenter = models.create("segmenter_t16_linear", img_size=32).state_dict()
    torch.save({"model": segmenter}, tmp_path / "checkpoint.pth")  # an official Segmenter checkpoint, ViT encoder
    torch.save({"model": {**segmenter, "encoder.dist_token": torch.zeros(1, 1, 192)}}, tmp_path / "distilled.pth")
    torch.save({"model": dino_s16.state_dict()}, tmp_path / "segjobs_dino.pth")  # backbone.* keys
    assert normalization_of(tmp_path / "checkpoint.pth") == "vit"
    assert normalization_of(tmp_path / "distilled.pth") == normalization_of(tmp_path / "segjobs_dino.pth") == "imagenet"
