"""Forward diffusion q(x_t | x_0) for any image, and per-sample forward trajectories in a dataset."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from fiftyone_diffusion.brain.media import atomic_save_image, check_writable_dir
from fiftyone_diffusion.errors import InputError
from fiftyone_diffusion.plugins.noise import q_sample

DEFAULT_LEVELS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2", "squaredcos_cap_v2": "squaredcos_cap_v2"}
FIELD = "forward_trajectory"
MAX_LEVELS = 32


@dataclass
class Schedule:
    """A DDPM noise schedule: beta_t and alpha-bar_t for the diffusers timestep indices 0..T-1."""

    name: str
    betas: torch.Tensor
    alphas_cumprod: torch.Tensor

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)


@functools.lru_cache(maxsize=16)
def _schedule(beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> Schedule:
    from diffusers import DDPMScheduler

    s = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                      beta_start=beta_start, beta_end=beta_end)
    return Schedule(beta_schedule, s.betas.clone(), s.alphas_cumprod.clone())


def noise_schedule(schedule: str | dict = "linear") -> Schedule:
    """The schedule of diffusers' DDPMScheduler: a name (linear, cosine) or a scheduler config dict."""
    if isinstance(schedule, dict):
        name = schedule.get("beta_schedule", "linear")
        if name not in SCHEDULES.values():
            raise InputError(f"unsupported beta_schedule {name!r} in the scheduler config")
        return _schedule(name, int(schedule.get("num_train_timesteps", 1000)),
                         float(schedule.get("beta_start", 0.0001)), float(schedule.get("beta_end", 0.02)))
    if schedule not in SCHEDULES:
        raise InputError(f"unknown schedule {schedule!r}; choose one of linear, cosine")
    return _schedule(SCHEDULES[schedule], 1000, 0.0001, 0.02)


def model_schedule(model: str | None) -> Schedule:
    """The training schedule of a DDPM folder (or the shipped model); linear when it cannot be read."""
    from fiftyone_diffusion.plugins.ddpm import SHIPPED_DDPM, SHIPPED_DDPM_DIR

    folder = SHIPPED_DDPM_DIR if model in (None, "", SHIPPED_DDPM) else os.path.expanduser(str(model))
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if os.path.isfile(path):
        import json

        try:
            with open(path) as f:
                return noise_schedule(json.load(f))
        except (OSError, ValueError):
            pass
    return noise_schedule("linear")


def level_timesteps(noise_levels: Sequence[float], num_timesteps: int = 1000) -> list[int]:
    """Fraction of T -> diffusers timestep index (level f > 0: round(f*T) - 1); level 0 -> -1, the clean image."""
    return [-1 if f <= 0 else min(num_timesteps - 1, max(0, round(f * num_timesteps) - 1)) for f in noise_levels]


def validate_levels(noise_levels) -> list[float]:
    try:
        levels = [float(v) for v in noise_levels]
    except (TypeError, ValueError):
        raise InputError(f"noise_levels must be numbers in [0, 1], got {noise_levels!r}") from None
    if not levels or len(levels) > MAX_LEVELS:
        raise InputError(f"give between 1 and {MAX_LEVELS} noise levels, got {len(levels)}")
    if any(not 0.0 <= v <= 1.0 for v in levels):
        raise InputError(f"noise levels must lie in [0, 1], got {levels}")
    return levels


def parse_levels(text: str) -> list[float]:
    """'0, 0.2, 0.5' -> [0.0, 0.2, 0.5] (the CLI's and the panel's way to write levels)."""
    try:
        return validate_levels([v for v in str(text).replace(";", ",").split(",") if v.strip()])
    except InputError:
        raise InputError(f"noise levels must be comma-separated numbers in [0, 1], got {text!r}") from None


@dataclass
class ForwardTrajectory:
    """x_t for each level, in model space (pixels in [-1, 1], or latents), not clamped."""

    frames: torch.Tensor  # (L, C, H, W)
    levels: list[float]
    timesteps: list[int]  # diffusers indices; -1 is the clean image
    alpha_bars: list[float]


def _to_model_space(image) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image.float()
    if isinstance(image, Image.Image):
        image = np.asarray(image)
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise InputError("images must be PIL images, uint8 arrays or float tensors in [-1, 1]")
    x = torch.from_numpy(arr.copy()).float().div(127.5).sub(1)
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1)


def forward_diffusion(
    image,
    noise_levels: Sequence[float] = DEFAULT_LEVELS,
    schedule: str | dict | Schedule = "linear",
    seed: int = 0,
) -> ForwardTrajectory:
    """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) at fractions of T.

    `image`: a PIL image, a uint8 array (H, W) or (H, W, C), or a float tensor (C, H, W) in model
    space. One noise draw from `seed` is shared by all levels, so the frames show the same noise
    growing (each frame still has exactly the marginal q(x_t | x_0)); the result depends only on
    the image, the levels, the schedule and the seed.
    """
    levels = validate_levels(noise_levels)
    sched = schedule if isinstance(schedule, Schedule) else noise_schedule(schedule)
    x0 = _to_model_space(image)
    timesteps = level_timesteps(levels, sched.num_timesteps)
    noise = torch.randn(x0.shape, generator=torch.Generator("cpu").manual_seed(int(seed)))
    # index -1 (the clean image) gets alpha-bar = 1 exactly
    abar = torch.cat([torch.ones(1, dtype=sched.alphas_cumprod.dtype), sched.alphas_cumprod])
    t = torch.tensor(timesteps) + 1
    x0s = x0[None].expand(len(levels), *x0.shape)
    frames = q_sample(x0s, t, noise[None].expand_as(x0s), abar)
    return ForwardTrajectory(frames, levels, timesteps, [float(abar[i]) for i in t])


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Frames in [-1, 1], (L, C, H, W) -> uint8 (L, H, W) or (L, H, W, 3)."""
    arr = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return arr[:, 0] if arr.shape[1] == 1 else arr.transpose(0, 2, 3, 1)


def strip_image(frames: np.ndarray) -> Image.Image:
    """uint8 frames side by side in one image (the format of the stored strips)."""
    row = np.concatenate(list(frames), axis=1)
    return Image.fromarray(row, mode="L" if row.ndim == 2 else "RGB")


class _Vae:
    """A diffusers AutoencoderKL: encode to scaled latents, decode frames back to pixels."""

    def __init__(self, folder: str, device: torch.device):
        from diffusers import AutoencoderKL

        sub = "vae" if os.path.isfile(os.path.join(folder, "vae", "config.json")) else None
        if not os.path.isfile(os.path.join(folder, sub or "", "config.json")):
            raise InputError(f"{folder} is not a diffusers AutoencoderKL folder: config.json is missing")
        try:
            self.model = AutoencoderKL.from_pretrained(folder, subfolder=sub).to(device).eval()
        except Exception as e:
            raise InputError(f"cannot load a VAE from {folder}: {e.__class__.__name__}: {e}") from None
        self.device = device
        self.scale = float(self.model.config.scaling_factor)
        self.factor = 2 ** (len(self.model.config.block_out_channels) - 1)
        self.channels = self.model.config.in_channels

    def prepare(self, image: Image.Image) -> Image.Image:
        image = image.convert("RGB" if self.channels == 3 else "L")
        w, h = (max(self.factor, v - v % self.factor) for v in image.size)
        return image.resize((w, h), Image.BICUBIC) if (w, h) != image.size else image

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x[None].to(self.device)).latent_dist.mean[0].cpu() * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z.to(self.device) / self.scale).sample.cpu()


def _load_image(path: str, max_size: int) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            image = im.convert("L") if im.mode in ("L", "1", "I", "I;16", "F", "LA") else im.convert("RGB")
    except OSError as e:
        raise InputError(f"cannot read image {path}: {e}") from None
    if max(image.size) > max_size:
        image.thumbnail((max_size, max_size), Image.BICUBIC)
    return image


def compute_forward_trajectory(
    view,
    noise_levels: Sequence[float] = DEFAULT_LEVELS,
    schedule: str = "cosine",
    seed: int = 0,
    vae: str | None = None,
    media_dir: str | None = None,
    max_size: int = 256,
    field: str = FIELD,
    device: str = "auto",
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Store a forward-noising strip (one PNG per sample) and its levels in `field` for every sample.

    Works for any image dataset: grayscale images stay grayscale, others become RGB; images are
    first shrunk to at most `max_size` pixels. With `vae` (a diffusers AutoencoderKL folder) the
    noise is added to the latents and each frame is decoded back to pixels; else in pixel space.
    """
    import fiftyone as fo

    from fiftyone_diffusion.plugins.devices import resolve_device

    levels = validate_levels(noise_levels)
    sched = noise_schedule(schedule)
    if max_size < 8:
        raise InputError(f"max_size must be at least 8, got {max_size}")
    if len(view) == 0:
        raise InputError("the view is empty: no sample to compute a forward trajectory for")
    ids, paths = view.values(["id", "filepath"])
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise InputError(f"{len(missing)} media file(s) are missing, for example {missing[0]}")
    autoencoder = None
    if vae:
        if not os.path.isdir(os.path.expanduser(vae)):
            raise InputError(f"VAE folder {vae} does not exist")
        autoencoder = _Vae(os.path.expanduser(vae), resolve_device(device))
    ds = view._root_dataset
    folder = media_dir or os.path.join(fo.config.default_dataset_dir, "fiftyone-diffusion", ds.name, "forward")
    folder = check_writable_dir(folder)

    bar = tqdm(total=len(ids), desc="forward-trajectory", disable=not progress)
    done = 0
    try:
        for sample_id, path in zip(ids, paths, strict=True):
            image = _load_image(path, max_size)
            if autoencoder is None:
                traj = forward_diffusion(image, levels, sched, seed)
                frames = traj.frames
            else:
                image = autoencoder.prepare(image)
                traj = forward_diffusion(autoencoder.encode(_to_model_space(image)), levels, sched, seed)
                frames = torch.cat([autoencoder.decode(f[None]) for f in traj.frames])
            pixels = to_uint8(frames)
            out = atomic_save_image(strip_image(pixels), os.path.join(folder, f"{sample_id}.png"))
            doc = fo.DynamicEmbeddedDocument(
                frames_path=out, num_frames=len(levels), noise_levels=levels, timesteps=traj.timesteps,
                alpha_bars=[round(a, 6) for a in traj.alpha_bars], schedule=schedule, seed=int(seed),
                space="latent" if autoencoder else "pixel", vae=vae or None,
                frame_width=int(pixels.shape[2]), frame_height=int(pixels.shape[1]),
            )
            ds.select(sample_id).set_values(field, [doc])
            done += 1
            bar.update(1)
            if on_progress:
                on_progress(done, len(ids))
    finally:
        bar.close()
    return {"dataset": ds.name, "computed": done, "field": field, "media_dir": folder,
            "noise_levels": levels, "schedule": schedule, "space": "latent" if autoencoder else "pixel"}
