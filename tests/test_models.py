import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
from launcher.cli import main as segjobs
from models.dino import DINOLoss, attention_masks, cosine_schedule
from models.segmenter import sliding_window_logits
from models.wnet import dense_soft_ncut_loss, soft_ncut_loss
from tests import reference_impls as ref

# The reference implementations' counts (rstrudel/segmenter at 150 classes, 512x512 unless noted;
# facebookresearch/dino with out_dim 65536).
REFERENCE_PARAMS = {
    "segmenter_t16_mask": 6_713_388,
    "segmenter_s16_linear": 22_041_366,
    "segmenter_s16_mask": 26_033_964,
    "segmenter_b16_mask": 102_497_580,
    "segmenter_b8_linear": 88_466_838,
    "segmenter_l16_mask": 333_234_476,  # at 640x640
}
DINO_VITS8 = {"backbone_params": 21_670_272, "head_params": 22_352_128}


def tiny_input(name: str) -> torch.Tensor:
    return torch.randn(2, 3, 40, 56)  # not a patch multiple: padding and cropping are exercised


@pytest.mark.parametrize("name", models.list_models())
def test_every_variant_runs_forward_and_backward(name):
    torch.manual_seed(0)
    family = models.entry(name).family
    options = {"out_dim": 256} if family == "dino" else {}
    model = models.create(name, **options)
    images = tiny_input(name)
    if family == "segmenter":
        out = model(images)
        assert out.shape == (2, 150, 40, 56)
    elif family == "dino":
        out = model([torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)])
        assert out.shape == (6, 256)
        assert model.backbone(images).shape == (2, model.config.backbone.embed_dim)
        grid = (40 // model.config.backbone.patch_size) * (56 // model.config.backbone.patch_size)
        assert model.attention_maps(images).shape == (2, model.config.backbone.num_heads, grid)
    else:
        probs, reconstruction = model(images)
        assert probs.shape == (2, 20, 40, 56) and reconstruction.shape == images.shape
        assert torch.allclose(probs.sum(1), torch.ones(2, 40, 56), atol=1e-5)
        out = probs + reconstruction.mean()
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_parameter_counts_match_the_reference(name):
    with torch.device("meta"):
        model = models.create(name)
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_PARAMS[name]


def test_models_command_lists_every_variant_with_counts(capsys):
    assert segjobs(["models", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert set(listed) == set(models.list_models())
    assert listed["dino_vits8"]["backbone_params"] == DINO_VITS8["backbone_params"]
    assert listed["dino_vits8"]["head_params"] == DINO_VITS8["head_params"]
    assert listed["dino_vits8"]["params"] == sum(DINO_VITS8.values())
    assert listed["segmenter_t16_mask"] == {"name": "segmenter_t16_mask", "family": "segmenter", "params": 6_713_388}
    assert segjobs(["models"]) == 0
    assert "segmenter_b8_linear" in capsys.readouterr().out


def random_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Non-trivial values everywhere (LayerNorm weights and biases included), so a wrong eps or key shows."""
    generator = torch.Generator().manual_seed(1)
    return {k: torch.randn(v.shape, generator=generator) * (0.5 if v.dim() > 1 else 0.2) + (1.0 if k.endswith("norm.weight") else 0.0)
            for k, v in model.state_dict().items()}


@pytest.mark.parametrize("decoder", ["linear", "mask"])
@pytest.mark.parametrize("size", [(64, 64), (40, 72), (64, 32)])
def test_segmenter_matches_the_reference_logits(decoder, size):
    model = models.create(f"segmenter_t16_{decoder}", img_size=64).eval()
    state = random_state(model)
    model.load_state_dict(state)
    images = torch.randn(2, 3, *size)
    expected = ref.segmenter_logits(state, images, patch=16, heads=3, decoder_heads=3, num_classes=150)
    assert torch.allclose(model(images), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", [(224, 224), (160, 224), (232, 232)])
def test_dino_matches_the_reference_features_and_attention(size):
    model = models.create("dino_vits16", out_dim=64).eval()
    state = {k: v for k, v in random_state(model.backbone).items()}
    model.backbone.load_state_dict(state)
    images = torch.randn(2, 3, *size)
    features, attention = ref.dino_forward(state, images, patch=16, heads=6)
    assert torch.allclose(model.backbone(images), features, atol=1e-4, rtol=1e-4)
    assert torch.allclose(model.attention_maps(images), attention[:, :, 0, 1:], atol=1e-5)


def test_soft_ncut_equals_the_dense_loss_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 17, 23, dtype=torch.float64)
    image = torch.rand(2, 3, 17, 23, dtype=torch.float64) * 255
    probs = logits.softmax(1).requires_grad_()
    dense_probs = probs.detach().clone().requires_grad_()
    loss = soft_ncut_loss(probs, image)
    dense = dense_soft_ncut_loss(dense_probs, image)
    assert abs(loss.item() - dense.item()) / dense.item() < 1e-5
    loss.backward()
    dense.backward()
    scale = dense_probs.grad.abs().max().item()  # float32 accumulation: errors relative to the largest gradient
    assert torch.allclose(probs.grad, dense_probs.grad, rtol=1e-4, atol=1e-6 * scale)
    radius3 = soft_ncut_loss(probs.detach(), image, radius=3, sigma_i=5.0, sigma_x=2.0)
    assert abs(radius3.item() - dense_soft_ncut_loss(probs.detach(), image, 3, 5.0, 2.0).item()) < 1e-5 * radius3.item()


def test_soft_ncut_keeps_only_two_maps_for_backward():
    probs = torch.rand(2, 4, 30, 30).softmax(1).requires_grad_()
    loss = soft_ncut_loss(probs, torch.rand(2, 3, 30, 30))
    saved = loss.grad_fn.next_functions[0][0].saved_tensors if not loss.grad_fn.saved_tensors else loss.grad_fn.saved_tensors
    big = [t for t in saved if t.numel() >= 30 * 30]
    assert sum(t.numel() for t in big) <= 2 * probs.numel()


def test_ncut_of_a_perfect_segmentation_is_low():
    image = torch.zeros(1, 3, 20, 20)
    image[..., 10:] = 255.0
    perfect = torch.zeros(1, 2, 20, 20)
    perfect[:, 0, :, :10] = perfect[:, 1, :, 10:] = 1
    blurred = torch.full_like(perfect, 0.5)
    assert soft_ncut_loss(perfect, image).item() < 1e-6 < soft_ncut_loss(blurred, image).item()


def test_dino_loss_matches_a_hand_computed_case():
    loss_fn = DINOLoss(out_dim=2, ncrops=3, warmup_teacher_temp=0.5, teacher_temp=0.5, warmup_teacher_temp_epochs=0,
                       student_temp=1.0, center_momentum=0.5)
    loss_fn.center.fill_(0.0)
    student = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])  # crops 0, 1 (global) and 2 (local), batch 1
    teacher = torch.tensor([[0.0, 0.5], [0.5, 0.0]])

    def softmax(values):
        exps = [math.exp(v) for v in values]
        return [e / sum(exps) for e in exps]

    targets = [softmax([0.0, 1.0]), softmax([1.0, 0.0])]  # teacher / 0.5
    log_probs = [[math.log(p) for p in softmax(s)] for s in student.tolist()]
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]  # (teacher view, student view), same view skipped
    expected = sum(-sum(t * l for t, l in zip(targets[a], log_probs[b])) for a, b in pairs) / len(pairs)
    assert loss_fn(student, teacher, epoch=0).item() == pytest.approx(expected, rel=1e-6)
    assert loss_fn.center[0].tolist() == pytest.approx([0.125, 0.125])  # 0.5 * 0 + 0.5 * mean(teacher)


def test_attention_masks_keep_the_top_mass():
    attention = torch.tensor([[0.1, 0.5, 0.25, 0.15]])
    assert attention_masks(attention, mass=0.6).tolist() == [[False, True, True, False]]


def test_teacher_momentum_schedule_runs_from_0_996_to_1():
    schedule = cosine_schedule(0.996, 1.0, epochs=10, steps_per_epoch=5)
    assert len(schedule) == 50 and schedule[0] == pytest.approx(0.996) and schedule[-1] == pytest.approx(1.0, abs=1e-5)
    assert (schedule[1:] >= schedule[:-1]).all()


def test_schedules_as_functions_equal_the_reference_arrays():
    """main_dino.py's cosine_scheduler and the teacher-temperature array, restated as arrays, against the pure
    functions of the step the trainer evaluates (nothing allocated per step)."""
    from launcher.training.schedules import cosine

    epochs, per_epoch = 7, 5
    array = cosine_schedule(0.996, 1.0, epochs=epochs, steps_per_epoch=per_epoch)
    assert [cosine(0.996, 1.0, step, epochs * per_epoch) for step in range(epochs * per_epoch)] == pytest.approx(array, abs=1e-15)
    loss = DINOLoss(out_dim=4, ncrops=4, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30)
    reference = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(70) * 0.07))
    assert [loss.teacher_temp(epoch) for epoch in range(100)] == pytest.approx(reference, abs=1e-15)


@pytest.mark.parametrize("kind", ["poly", "cosine", "constant"])
def test_learning_rate_is_warmup_then_the_decay_of_its_kind(kind):
    from launcher.spec import parse_spec
    from launcher.training.schedules import Horizon, learning_rate

    spec = parse_spec({"name": "s", "model": {"name": "wnet_tiny"}, "data": {"train": "x"}, "train": {"max_steps": 50},
                       "optim": {"lr": 0.01}, "schedule": {"kind": kind, "warmup_steps": 10, "min_lr": 0.001}}, "test")
    horizon = Horizon.of(spec, steps_per_epoch=7, global_batch=64)
    rates = np.array([learning_rate(spec, horizon, step) for step in range(50)])
    warmup, t = np.linspace(0, 0.01, 10), np.arange(40) / 40  # the warmup reaches the peak on its last step
    decay = {"poly": 0.001 + 0.009 * (1 - t) ** 0.9, "cosine": 0.001 + 0.0045 * (1 + np.cos(np.pi * t)),
             "constant": np.full(40, 0.01)}[kind]
    assert rates == pytest.approx(np.concatenate([warmup, decay]), abs=1e-15)


@pytest.mark.parametrize("size, window, stride", [((48, 80), 32, 32), ((40, 70), 32, 24), ((20, 50), 32, 32), ((50, 20), 32, 16)])
def test_sliding_window_is_the_references_inference(size, window, stride):
    """Overlapping windows, the last aligned to the border, and short sides enlarged to the window, against
    segm's resize / sliding_window / merge_windows restated."""
    model = models.create("segmenter_t16_linear", img_size=32).eval()
    image = torch.randn(1, 3, *size)
    logits = sliding_window_logits(model, image, window=window, stride=stride, batch=3)
    ours = F.interpolate(logits, size=(60, 90), mode="bilinear").softmax(1)[0]
    assert torch.allclose(ours, ref.segm_inference(model, image, window, stride, (60, 90)), atol=1e-6)


def test_soft_ncut_refuses_a_second_backward():
    probs = torch.rand(1, 3, 12, 12).softmax(1).requires_grad_()
    loss = soft_ncut_loss(probs, torch.rand(1, 3, 12, 12))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single backward"):
        loss.backward()
