"""The DDPM U-Net: diffusers' UNet2DModel whose decoder upsamples by resize-convolution.

Transposed convolutions with stride 2 leave checkerboard artifacts (Odena et al., 2016);
interpolating first and convolving after does not. The mode is part of the saved config, so
`DigitUNet.from_pretrained` rebuilds the same network. The parameter names are diffusers' own,
so plain `UNet2DModel.from_pretrained` loads the weights too (it then resizes with `nearest`).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.configuration_utils import register_to_config
from torch import nn

UPSAMPLE_MODES = ("bilinear", "nearest", "transposed")
NULL_CLASS = 10  # class index used for the unconditional branch of classifier-free guidance


class ResizeConvUpsample(nn.Module):
    """2x upsampling as interpolation followed by a 3x3 convolution."""

    def __init__(self, channels: int, mode: str = "bilinear"):
        super().__init__()
        self.mode = mode
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        size = output_size if output_size is not None else None
        scale = None if size is not None else 2.0
        extra = {"align_corners": False} if self.mode == "bilinear" else {}
        hidden_states = F.interpolate(hidden_states, size=size, scale_factor=scale, mode=self.mode, **extra)
        return self.conv(hidden_states)


class TransposedConvUpsample(nn.Module):
    """2x upsampling by a stride-2 transposed convolution (kept for comparison)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(channels, channels, kernel_size=4, stride=2, padding=1)

    def forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        return self.conv(hidden_states)


def make_upsampler(channels: int, mode: str) -> nn.Module:
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"upsample_mode must be one of {UPSAMPLE_MODES}, got {mode!r}")
    return TransposedConvUpsample(channels) if mode == "transposed" else ResizeConvUpsample(channels, mode)


# Defaults of the digit model; every other UNet2DModel option keeps diffusers' default.
DIGIT_DEFAULTS = dict(
    sample_size=32,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    # 8 groups, not diffusers' 32: with 32 channels, 32 groups is a per-channel norm that removes each
    # channel's spatial mean, so the output (after conv_norm_out) cannot follow the input's global
    # brightness; the shipped 32-group model's predicted noise barely moves with a DC offset of its input,
    # and its samples keep the starting noise's mean as grey or white backgrounds.
    norm_num_groups=8,
    attention_head_dim=32,
    num_class_embeds=11,
)


def _digit_unet_init(self, upsample_mode: str = "bilinear", **kwargs):
    UNet2DModel.__init__.__wrapped__(self, **{**DIGIT_DEFAULTS, **kwargs})
    for block in self.up_blocks:
        if getattr(block, "upsamplers", None):
            channels = block.upsamplers[0].channels
            block.upsamplers = nn.ModuleList([make_upsampler(channels, upsample_mode)])


# The signature lists every UNet2DModel option (with the digit defaults) plus `upsample_mode`, so
# that diffusers' config machinery saves, loads and validates all of them.
_params = [
    p.replace(default=DIGIT_DEFAULTS.get(name, p.default))
    for name, p in inspect.signature(UNet2DModel.__init__).parameters.items()
]
_digit_unet_init.__signature__ = inspect.Signature(
    [*_params, inspect.Parameter("upsample_mode", inspect.Parameter.KEYWORD_ONLY, default="bilinear")]
)


class DigitUNet(UNet2DModel):
    """UNet2DModel whose decoder upsamples by resize-convolution (`upsample_mode`, bilinear by default)."""

    __init__ = register_to_config(_digit_unet_init)


def checkerboard_spread(upsampler: nn.Module, channels: int, size: int = 8) -> float:
    """Spread of the mean output over the four stride-2 phases, on a constant input.

    Zero means no checkerboard: every output phase sees the same response. The border,
    where zero padding acts, is left out.
    """
    with torch.no_grad():
        out = upsampler(torch.ones(1, channels, size, size))[..., 2:-2, 2:-2]
    phases = torch.stack([out[..., i::2, j::2].mean() for i in (0, 1) for j in (0, 1)])
    return float(phases.max() - phases.min())
