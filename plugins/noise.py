"""Diffusion math, named like the DDPM paper; written once for training, sampling and panels."""

from __future__ import annotations

import torch


def _gather(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    out = values.to(t.device)[t].float()
    return out.reshape(-1, *([1] * (ndim - 1)))


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), with the given noise."""
    abar = _gather(alphas_cumprod, t, x0.ndim)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def predict_start_from_noise(
    xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """x_0 estimate from x_t and the predicted noise."""
    abar = _gather(alphas_cumprod, t, xt.ndim)
    return (xt - (1 - abar).sqrt() * eps) / abar.sqrt()


def velocity(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The v-prediction target sqrt(abar_t) noise - sqrt(1 - abar_t) x_0 (Salimans & Ho, 2022)."""
    abar = _gather(alphas_cumprod, t, x0.ndim)
    return abar.sqrt() * noise - (1 - abar).sqrt() * x0


def noise_from_output(
    xt: torch.Tensor, t: torch.Tensor, output: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The predicted noise from a model output of `prediction_type` ("epsilon" or "v_prediction")."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        abar = _gather(alphas_cumprod, t, xt.ndim)
        return abar.sqrt() * output + (1 - abar).sqrt() * xt
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def snr_db(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio abar / (1 - abar) in decibels."""
    abar = alphas_cumprod.double()
    return (10 * torch.log10(abar / (1 - abar))).float()
