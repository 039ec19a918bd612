"""W-Net's options that deviate from the paper on request: how the convolutions pad (padding_mode) and
U-Dec's own dropout rate (decoder_dropout)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from launcher.spec import SpecError, check_environment, parse_spec
from models.wnet import WNet, WNetConfig


def one_level_wnet(padding_mode: str) -> WNet:
    """No pooling or transposed convolution: only the 3x3 convolutions' padding can make a pixel differ from
    its neighbours on a uniform image."""
    torch.manual_seed(0)
    config = WNetConfig(num_segments=3, base_channels=4, levels=1, dropout=0.0, padding_mode=padding_mode)
    return WNet(config).eval()


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate"])
def test_a_uniform_image_gets_no_band_along_the_borders(padding_mode):
    image = torch.full((1, 3, 12, 12), 0.3)
    with torch.no_grad():
        probs, reconstruction = one_level_wnet(padding_mode)(image)
    for output in (probs, reconstruction):
        assert torch.allclose(output, output[..., :1, :1].expand_as(output), atol=1e-6)


def test_zero_padding_draws_the_borders_differently():
    """The default (zeros, as the PyTorch W-Nets that follow the paper closely) keeps the border effect the other
    modes remove."""
    image = torch.full((1, 3, 12, 12), 0.3)
    with torch.no_grad():
        _, reconstruction = one_level_wnet("zeros")(image)
    corner, centre = reconstruction[0, :, 0, 0], reconstruction[0, :, 6, 6]
    assert (corner - centre).abs().max() > 1e-3


def test_every_3x3_convolution_of_both_unets_pads_as_asked():
    model = WNet(WNetConfig(base_channels=4, levels=3, num_segments=3, padding_mode="replicate"))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 2 * 2 * 5  # two U-Nets of 5 modules (levels 3), two 3x3 convolutions each
    assert {conv.padding_mode for conv in convs} == {"replicate"}
    assert {m.padding_mode for m in WNet(WNetConfig(base_channels=4, levels=3)).modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)} == {"zeros"}


def test_decoder_dropout_applies_to_u_dec_only():
    model = WNet(WNetConfig(base_channels=4, levels=3, dropout=0.2, decoder_dropout=0.0))
    rates = {name: {m.p for m in unet.modules() if isinstance(m, nn.Dropout)}
             for name, unet in (("encoder", model.encoder), ("decoder", model.decoder))}
    assert rates == {"encoder": {0.2}, "decoder": {0.0}}
    default = WNet(WNetConfig(base_channels=4, levels=3, dropout=0.2))
    assert {m.p for m in default.modules() if isinstance(m, nn.Dropout)} == {0.2}  # the paper: one rate


def test_a_spec_with_an_unknown_padding_mode_is_refused():
    spec = parse_spec({"name": "s", "model": {"name": "wnet_tiny", "options": {"padding_mode": "circular"}},
                       "data": {"train": "x"}, "train": {"max_steps": 1}}, "spec.yaml")
    with pytest.raises(SpecError, match="padding_mode"):
        check_environment(spec, "spec.yaml")

