"""The DDPM U-Net: resize-convolution decoder, config round trip, plain diffusers loading."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

from fiftyone_diffusion.plugins.unet import (
    DigitUNet,
    ResizeConvUpsample,
    TransposedConvUpsample,
    checkerboard_spread,
    make_upsampler,
)


def test_checkerboard_signature_zero_for_resize_convolution_only():
    torch.manual_seed(0)
    assert checkerboard_spread(make_upsampler(16, "bilinear"), 16) < 1e-6
    assert checkerboard_spread(make_upsampler(16, "nearest"), 16) < 1e-6
    assert checkerboard_spread(make_upsampler(16, "transposed"), 16) > 1e-3


def test_decoder_uses_the_configured_upsampling():
    for mode, cls in (("bilinear", ResizeConvUpsample), ("nearest", ResizeConvUpsample),
                      ("transposed", TransposedConvUpsample)):
        unet = DigitUNet(block_out_channels=(32, 32, 32), upsample_mode=mode)
        ups = [b.upsamplers[0] for b in unet.up_blocks if getattr(b, "upsamplers", None)]
        assert len(ups) == 2 and all(isinstance(u, cls) for u in ups)
        x = torch.randn(2, 1, 32, 32)
        assert unet(x, torch.tensor([10, 500]), class_labels=torch.tensor([3, 10])).sample.shape == x.shape


def test_save_and_load_round_trip_and_plain_diffusers(tmp_path):
    torch.manual_seed(0)
    unet = DigitUNet(block_out_channels=(32, 32, 32)).eval()
    unet.save_pretrained(tmp_path)
    again = DigitUNet.from_pretrained(tmp_path).eval()
    assert again.config.upsample_mode == "bilinear"
    x, t, y = torch.randn(1, 1, 32, 32), torch.tensor([100]), torch.tensor([7])
    with torch.no_grad():
        assert torch.allclose(unet(x, t, class_labels=y).sample, again(x, t, class_labels=y).sample, atol=1e-5)
    plain, info = UNet2DModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
