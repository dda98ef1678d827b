"""DDPM generator backend: load a diffusers DDPM folder, pick a sampler, run the sampling loop."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel

from fiftyone_diffusion.errors import InputError
from fiftyone_diffusion.plugins.classifier import WEIGHTS_DIR
from fiftyone_diffusion.plugins.ddpm_samplers import SAMPLERS, STOCHASTIC_SAMPLERS
from fiftyone_diffusion.plugins.noise import noise_from_output, predict_start_from_noise
from fiftyone_diffusion.plugins.unet import DigitUNet

SHIPPED_DDPM = "ddpm-mnist"
SHIPPED_DDPM_DIR = os.path.join(WEIGHTS_DIR, SHIPPED_DDPM)
SHIPPED_GUIDE = "ddpm-mnist-guide"  # an earlier, weaker ddpm-mnist: autoguidance for unconditional samples
SHIPPED_DDPMS = (SHIPPED_DDPM, SHIPPED_GUIDE)
MAX_STEPS = 1000


def make_scheduler(sampler: str, ddpm_config: dict):
    """A fresh diffusers scheduler for `sampler`, built from the training (DDPM) config."""
    if sampler == "ddpm":
        return DDPMScheduler.from_config(ddpm_config)
    if sampler == "ddim":
        # DDIM must not inherit DDPM's clip_sample=True: clipping x0 early ruins its samples.
        return DDIMScheduler.from_config(ddpm_config, clip_sample=False, set_alpha_to_one=True)
    if sampler in ("dpmsolver++", "dpmsolver++-sde"):
        # "-sde": DPM-Solver++(2M) SDE, which re-injects noise each step like ancestral DDPM does
        return DPMSolverMultistepScheduler.from_config(
            ddpm_config, algorithm_type="sde-dpmsolver++" if sampler.endswith("-sde") else "dpmsolver++",
            solver_order=2, final_sigmas_type="zero",
        )
    raise InputError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


@dataclass
class DDPMModel:
    """A loaded DDPM: the U-Net, its training scheduler config and what it was trained on."""

    unet: UNet2DModel
    scheduler_config: dict
    name: str
    classes: list[str] | None = None  # class-conditional models: the class names, in index order
    null_class: int | None = None  # index of the unconditional (CFG) class
    image_size: int | None = None  # crop generated images to this size (MNIST: 28 from 32)
    extra: dict = field(default_factory=dict)

    @property
    def conditional(self) -> bool:
        return self.classes is not None

    @property
    def channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def is_digit_model(self) -> bool:
        return self.classes == [str(i) for i in range(10)] and self.channels == 1


_CACHE: dict[tuple[str, str], DDPMModel] = {}


def load_ddpm(model: str | None = None, device: torch.device | str = "cpu") -> DDPMModel:
    """Load a shipped model (None or 'ddpm-mnist', 'ddpm-mnist-guide'), a local DDPM pipeline folder, or a hub id."""
    name = model or SHIPPED_DDPM
    folder = os.path.join(WEIGHTS_DIR, name) if name in SHIPPED_DDPMS else os.path.expanduser(name)
    key = (os.path.abspath(folder) if os.path.isdir(folder) else name, str(device))
    if key in _CACHE:
        return _CACHE[key]
    if os.path.isdir(folder):
        for needed in ("unet/config.json", "scheduler/scheduler_config.json"):
            if not os.path.isfile(os.path.join(folder, needed)):
                raise InputError(f"{folder} is not a DDPM pipeline folder: {needed} is missing")
    elif name in SHIPPED_DDPMS:
        raise InputError(f"the shipped DDPM {name} is missing at {folder}; reinstall fiftyone-diffusion")
    elif os.sep in name and not name.count("/") == 1:
        raise InputError(f"DDPM model folder {name} does not exist")
    try:
        with open(_hub_file(folder, "unet/config.json")) as f:
            unet_config = json.load(f)
        cls = DigitUNet if "upsample_mode" in unet_config else UNet2DModel
        previous = logging.getLogger("diffusers").level
        logging.getLogger("diffusers").setLevel(logging.ERROR)
        try:
            unet = cls.from_pretrained(folder, subfolder="unet")
        finally:
            logging.getLogger("diffusers").setLevel(previous)
        scheduler_config = dict(DDPMScheduler.load_config(folder, subfolder="scheduler"))
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot load a DDPM from {name!r}: {e.__class__.__name__}: {e}") from None
    meta = {}
    meta_path = os.path.join(folder, "fiftyone_diffusion.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    classes = meta.get("classes")
    if classes is None and unet.config.num_class_embeds:
        classes = [str(i) for i in range(unet.config.num_class_embeds - 1)]
    loaded = DDPMModel(
        unet=unet.to(device).eval(),
        scheduler_config=scheduler_config,
        name=name,
        classes=classes,
        null_class=meta.get("null_class", len(classes) if classes else None),
        image_size=meta.get("image_size"),
        extra=meta,
    )
    _CACHE[key] = loaded
    return loaded


def _hub_file(folder: str, filename: str) -> str:
    if os.path.isdir(folder):
        return os.path.join(folder, filename)
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(folder, filename)
    except Exception as e:
        raise InputError(
            f"DDPM model {folder!r} is not a local folder and is not available from the Hugging Face "
            f"hub or its cache ({e.__class__.__name__}); download it where you are online "
            f"(huggingface-cli download {folder}) or pass the path of a local copy"
        ) from None


def check_guide(model: DDPMModel, guide: DDPMModel) -> None:
    """Raise InputError unless `guide` predicts the same quantity on the same noise schedule and images."""
    keys = ("prediction_type", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end")
    for key in keys:
        if model.scheduler_config.get(key) != guide.scheduler_config.get(key):
            raise InputError(f"guide model {guide.name!r} has {key}={guide.scheduler_config.get(key)!r}, "
                             f"model {model.name!r} has {model.scheduler_config.get(key)!r}: they must match")
    for key in ("in_channels", "sample_size"):
        if getattr(model.unet.config, key) != getattr(guide.unet.config, key):
            raise InputError(f"guide model {guide.name!r} has {key}={getattr(guide.unet.config, key)}, "
                             f"model {model.name!r} has {getattr(model.unet.config, key)}: they must match")


@dataclass
class StepRecord:
    """What the sampling loop reports at each step, for trajectories and statistics."""

    index: int
    timestep: int
    xt: torch.Tensor  # the sample before this step
    x0: torch.Tensor  # the model's estimate of the clean image at this step
    eps: torch.Tensor  # the (guided) predicted noise


def sample(
    model: DDPMModel,
    seeds: list[int],
    sampler: str = "dpmsolver++",
    steps: int = 20,
    labels: list[int | None] | None = None,
    guidance_scale: float = 1.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    on_step: Callable[[StepRecord], None] | None = None,
    guide: DDPMModel | None = None,
    guide_scale: float = 1.0,
) -> torch.Tensor:
    """Sample one image per seed; returns floats in [0, 1], shape (N, C, H, W).

    Each sample draws all of its noise from its own generator, so a sample depends only on its
    own seed and label, not on its batch mates; low-precision kernels (bf16, GPUs) may still round
    differently for another batch size, so regenerate it in a batch of the same size.

    Conditional samples use classifier-free guidance (`guidance_scale`). With a `guide`, unconditional
    samples use autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of
    itself"): output = guide + guide_scale * (model - guide), the guide being a weaker model of the same
    kind (here: an earlier checkpoint), queried with its own null class.
    """
    device = torch.device(device)
    scheduler = make_scheduler(sampler, model.scheduler_config)
    scheduler.set_timesteps(steps, device=device)
    size = model.unet.config.sample_size
    shape = (1, model.channels, size, size)
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    x = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(device)
    x = x * scheduler.init_noise_sigma
    class_labels = None
    guided = False
    if model.conditional:
        lab = [model.null_class if v is None else int(v) for v in (labels or [None] * len(seeds))]
        class_labels = torch.tensor(lab, device=device)
        guided = guidance_scale != 1.0 and any(v != model.null_class for v in lab)
        null = torch.full_like(class_labels, model.null_class)
    auto_rows = None
    if guide is not None and guide_scale != 1.0:
        check_guide(model, guide)
        auto_rows = torch.ones(len(seeds), dtype=torch.bool, device=device)
        if class_labels is not None:
            auto_rows = class_labels == model.null_class
        if not auto_rows.any():
            auto_rows = None
        elif guide.conditional:
            guide_labels = torch.full((int(auto_rows.sum()),), guide.null_class, device=device)
        else:
            guide_labels = None
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    prediction_type = scheduler.config.prediction_type
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            model_in = scheduler.scale_model_input(x, t)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                if guided:
                    both = model.unet(
                        torch.cat([model_in, model_in]), t, class_labels=torch.cat([class_labels, null])
                    ).sample.float()
                    out_c, out_u = both.chunk(2)
                    output = out_u + guidance_scale * (out_c - out_u)
                else:
                    output = model.unet(model_in, t, class_labels=class_labels).sample.float()
                if auto_rows is not None:
                    weak = guide.unet(model_in[auto_rows], t, class_labels=guide_labels).sample.float()
                    output[auto_rows] = weak + guide_scale * (output[auto_rows] - weak)
            if on_step is not None:
                tt = torch.full((len(x),), int(t), device=device, dtype=torch.long)
                eps = noise_from_output(x, tt, output, alphas_cumprod, prediction_type)
                on_step(StepRecord(i, int(t), x, predict_start_from_noise(x, tt, eps, alphas_cumprod), eps))
            kwargs = {"generator": generators} if sampler in STOCHASTIC_SAMPLERS else {}
            x = scheduler.step(output, t, x, **kwargs).prev_sample
    images = (x.float().clamp(-1, 1) + 1) / 2
    if model.image_size and model.image_size < size:
        off = (size - model.image_size) // 2
        images = images[..., off : off + model.image_size, off : off + model.image_size]
    return images.cpu()
