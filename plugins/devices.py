"""Device and precision choice."""

from __future__ import annotations

import functools
import os

import torch

from fiftyone_diffusion.errors import InputError

DEVICE_ENV = "FIFTYONE_DIFFUSION_DEVICE"  # what `auto` means in this process (set by `fiftyone-diffusion worker`)


def resolve_device(device: str | None = "auto") -> torch.device:
    """`auto` picks $FIFTYONE_DIFFUSION_DEVICE if set, else cuda, then mps, then cpu; a named device must exist."""
    if device in (None, "", "auto") and os.environ.get(DEVICE_ENV, "auto").strip() not in ("", "auto"):
        device = os.environ[DEVICE_ENV].strip()
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {device!r} requested but MPS is not available")
    return dev


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True where the CPU runs bf16 matrix work natively (AMX or AVX512-BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in (" amx_bf16", " avx512_bf16"))


def fast_dtype(device: torch.device) -> torch.dtype:
    """The fastest dtype that keeps outputs close to fp32 on this device (fp32 as fallback)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision context (a no-op in fp32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
