"""SDXL generator backend: load any SDXL-architecture diffusers pipeline, pick a scheduler, generate with previews."""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from fiftyone_diffusion.errors import InputError
from fiftyone_diffusion.plugins.devices import resolve_device

DEFAULT_SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PREVIEWS = ("latent", "vae")
# scheduler name -> (diffusers class name, overrides of the pipeline's scheduler config)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                 "use_karras_sigmas": False}),
    "dpm++_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                        "use_karras_sigmas": True}),
    "dpm++_2m_sde_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2,
                                                            "use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
# Linear map from SDXL's 4 latent channels to RGB (the widely used ComfyUI preview factors)
LATENT_RGB = torch.tensor([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362],
                           [-0.3165, -0.2492, -0.2188]])
LATENT_RGB_BIAS = torch.tensor([0.1084, -0.0175, -0.0011])


def make_scheduler(name: str, config: dict):
    """A fresh diffusers scheduler called `name`, built from the pipeline's own scheduler config."""
    import diffusers

    if name not in SCHEDULERS:
        raise InputError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(config, **overrides)


@dataclass
class SDXLModel:
    """A loaded SDXL pipeline, its original scheduler config and where it runs."""

    pipe: object  # diffusers.StableDiffusionXLPipeline
    name: str
    dtype: torch.dtype
    device: torch.device
    scheduler_config: dict
    cpu_offload: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)  # one generation at a time per pipeline

    @property
    def precision(self) -> str:
        return {v: k for k, v in PRECISIONS.items()}[self.dtype]

    @property
    def vae_scale(self) -> int:
        return self.pipe.vae_scale_factor


_CACHE: dict[tuple, SDXLModel] = {}


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """`auto`: fp16 on CUDA and MPS, fp32 on CPU."""
    if precision == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if precision not in PRECISIONS:
        raise InputError(f"precision must be auto, {', '.join(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "~", os.sep)) or name.count("/") != 1


def _unavailable(name: str, reason: str) -> InputError:
    return InputError(
        f"SDXL model {name!r} is not a local folder and is not available from the Hugging Face hub or its cache "
        f"({reason}); download it where you are online (huggingface-cli download {name}; set HF_HOME or "
        f"HF_HUB_CACHE to use that cache here) or pass model=<path of a local copy of the pipeline folder>"
    )


def check_sdxl_source(model: str | None, refiner: bool = False) -> str:
    """Resolve `model` (None, hub id or folder) to a local folder or a hub id, and check it is an SDXL pipeline
    (with `refiner`: any SDXL-architecture pipeline, used as image-to-image refiner).

    Raises InputError (before anything heavy is loaded) for a missing folder, a folder that is not an
    SDXL pipeline, and a hub id that is not available (offline and not in the cache).
    """
    name = model or DEFAULT_SDXL
    folder = os.path.expanduser(name)
    if os.path.isdir(folder):
        index = os.path.join(folder, "model_index.json")
        unet = os.path.join(folder, "unet", "config.json")
    elif _looks_like_path(name):
        raise InputError(f"SDXL model folder {name} does not exist")
    else:
        from huggingface_hub import hf_hub_download

        try:
            index, unet = (hf_hub_download(name, f) for f in ("model_index.json", "unet/config.json"))
        except Exception as e:
            raise _unavailable(name, e.__class__.__name__) from None
    for path in (index, unet):
        if not os.path.isfile(path):
            raise InputError(f"{name} is not a diffusers SDXL pipeline: {os.path.relpath(path, folder)} is missing")
    with open(unet) as f:
        if json.load(f).get("addition_embed_type") != "text_time":
            raise InputError(f"{name} is not an SDXL pipeline: its U-Net has no SDXL text_time conditioning")
    with open(index) as f:
        if not refiner and "text_encoder" not in json.load(f):
            raise InputError(f"{name} is not an SDXL text-to-image pipeline (no text_encoder: a refiner?)")
    return os.path.abspath(folder) if os.path.isdir(folder) else name


def load_sdxl(model: str | None = None, device: torch.device | str = "auto", precision: str = "auto",
              cpu_offload: bool = False, refiner: bool = False) -> SDXLModel:
    """Load (once per process) an SDXL pipeline from a hub id or a local folder.

    Cached by (model, dtype, device, offload). SDPA attention; `cpu_offload` keeps only the active
    sub-model on the accelerator (ignored on CPU). `refiner`: load it as an image-to-image pipeline
    (e.g. stabilityai/stable-diffusion-xl-refiner-1.0).
    """
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    dev = resolve_device(device) if isinstance(device, str) else device
    dtype = resolve_precision(precision, dev)
    offload = bool(cpu_offload) and dev.type != "cpu"
    source = check_sdxl_source(model, refiner)
    key = (source, str(dtype), str(dev), offload, refiner)
    if key in _CACHE:
        return _CACHE[key]
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    quiet = [logging.getLogger(n) for n in ("diffusers", "transformers")]
    levels = [q.level for q in quiet]
    bars = [m for m in (diffusers_logging, transformers_logging) if m.is_progress_bar_enabled()]
    for q in quiet:
        q.setLevel(logging.ERROR)
    for m in bars:
        m.disable_progress_bar()
    try:
        pipe = _from_pretrained(StableDiffusionXLImg2ImgPipeline if refiner else StableDiffusionXLPipeline, source,
                                dtype)
    except InputError:
        raise
    except Exception as e:
        if os.path.isdir(source):
            raise InputError(f"cannot load an SDXL pipeline from {source}: {e.__class__.__name__}: {e}") from None
        raise _unavailable(source, f"{e.__class__.__name__}: {str(e).splitlines()[0][:200]}") from None
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
        for m in bars:
            m.enable_progress_bar()
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    if offload:
        pipe.enable_model_cpu_offload(device=dev)
    else:
        pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    loaded = SDXLModel(pipe=pipe, name=model or DEFAULT_SDXL, dtype=dtype, device=dev,
                       scheduler_config=dict(pipe.scheduler.config), cpu_offload=offload)
    _CACHE[key] = loaded
    return loaded


def _from_pretrained(cls, source: str, dtype: torch.dtype):
    """safetensors only; half precision tries the repo's fp16 variant first (half the download)."""
    if dtype != torch.float32:
        try:
            return cls.from_pretrained(source, torch_dtype=dtype, use_safetensors=True, variant="fp16")
        except Exception:
            pass
    return cls.from_pretrained(source, torch_dtype=dtype, use_safetensors=True)


def latent_to_rgb(latents: torch.Tensor) -> torch.Tensor:
    """Cheap preview: SDXL latents (N, 4, h, w) -> RGB in [0, 1] (N, 3, h, w) by a fixed linear map."""
    x = latents.float().cpu()
    rgb = torch.einsum("nchw,cr->nrhw", x, LATENT_RGB) + LATENT_RGB_BIAS[None, :, None, None]
    return ((rgb + 1) / 2).clamp(0, 1)


class TrajectoryRecorder:
    """`callback_on_step_end` hook keeping K evenly spaced previews of x_t and of the predicted x_0."""

    def __init__(self, steps: int, frames: int, preview: str = "latent"):
        self.keep = sorted({int(round(v)) for v in np.linspace(0, steps - 1, frames)}) if frames else []
        self.preview = preview
        self.xt, self.x0, self.timesteps, self.all_timesteps, self.latent_std = [], [], [], [], []
        self._last_x0 = None
        self.offset = 0  # steps already run by an earlier pipeline (the base, before a refiner)

    def watch(self, scheduler) -> None:
        """Wrap `scheduler.step` to see its x_0 estimate (kept signature: the pipeline inspects it)."""
        step = scheduler.step

        @functools.wraps(step)
        def recording_step(*args, **kwargs):
            out = step(*args, **kwargs)
            x0 = out[1] if isinstance(out, tuple) and len(out) > 1 else getattr(out, "pred_original_sample", None)
            if x0 is None and getattr(scheduler, "model_outputs", None):  # DPM-Solver++ keeps x_0 predictions
                x0 = scheduler.model_outputs[-1]
            self._last_x0 = x0
            return out

        scheduler.step = recording_step

    def _frames(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        if self.preview == "vae":
            vae = pipe.vae
            param = next(vae.post_quant_conv.parameters())
            dtype = torch.float32 if param.dtype == torch.float16 and vae.config.force_upcast else param.dtype
            with torch.no_grad():
                images = vae.to(dtype=dtype).decode(latents.to(param.device, dtype) / vae.config.scaling_factor)[0]
            vae.to(dtype=param.dtype)
            size = (2 * latents.shape[-2], 2 * latents.shape[-1])
            images = torch.nn.functional.interpolate(images.float(), size=size, mode="area")
            return ((images.cpu() + 1) / 2).clamp(0, 1)
        return latent_to_rgb(latents)

    def __call__(self, pipe, i: int, t, kwargs: dict) -> dict:
        latents = kwargs["latents"]
        sched = pipe.scheduler
        i += self.offset
        self.all_timesteps.append(int(t))
        if float(getattr(sched, "init_noise_sigma", 1.0)) > 1.0 and getattr(sched, "step_index", None) is not None:
            sigma = float(sched.sigmas[min(sched.step_index, len(sched.sigmas) - 1)])
            scaled = latents / (sigma**2 + 1) ** 0.5  # variance-exploding latents -> the model's input scale
        else:
            scaled = latents
        self.latent_std.append(scaled.float().std(dim=(1, 2, 3)).cpu())
        if i in self.keep:
            self.timesteps.append(int(t))
            self.xt.append(self._frames(pipe, scaled))
            x0 = self._last_x0 if self._last_x0 is not None else scaled
            self.x0.append(self._frames(pipe, x0))
        return kwargs

    def strip(self, i: int) -> np.ndarray:
        """Sample i's frames as one uint8 image: x_t on the top row, predicted x_0 below."""
        rows = [torch.cat([f[i] for f in frames], dim=-1) for frames in (self.xt, self.x0)]
        return to_uint8(torch.cat(rows, dim=-2)[None])[0]

    def document(self, i: int, path: str) -> dict:
        return {"frames_path": path, "num_frames": len(self.timesteps), "step_indices": self.keep,
                "timesteps": self.timesteps, "all_timesteps": self.all_timesteps, "preview": self.preview,
                "latent_std": [round(float(v[i]), 5) for v in self.latent_std]}


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[0, 1] floats (N, 3, H, W) -> uint8 (N, H, W, 3), rounding like diffusers' PIL output."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def generate(
    model: SDXLModel,
    prompts: list[str],
    seeds: list[int],
    negative_prompt: str | None = None,
    steps: int = 30,
    guidance_scale: float = 5.0,
    width: int = 1024,
    height: int = 1024,
    scheduler: str = "euler",
    recorder: TrajectoryRecorder | None = None,
    vae_slicing: bool = False,
    vae_tiling: bool = False,
    refiner: SDXLModel | None = None,
    refiner_start: float = 0.8,
) -> np.ndarray:
    """One batch: image i from prompts[i] and its own seed seeds[i] (a CPU generator each). uint8 (N, H, W, 3).

    With a `refiner`, the base denoises the first `refiner_start` of the schedule and the refiner the rest
    (SDXL's ensemble of expert denoisers), both with the same scheduler and generators seeded alike.
    """
    common = dict(prompt=list(prompts), negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
                  num_inference_steps=steps, guidance_scale=guidance_scale)
    base = dict(width=width, height=height)
    if refiner is not None:
        base.update(denoising_end=refiner_start, output_type="latent")
    out = _run(model, scheduler, seeds, recorder, vae_slicing, vae_tiling, **common, **base)
    if refiner is None:
        return to_uint8(out)
    if recorder is not None:
        recorder.offset = len(recorder.all_timesteps)
    out = _run(refiner, scheduler, seeds, recorder, vae_slicing, vae_tiling, **common, image=out,
               denoising_start=refiner_start)
    return to_uint8(out)


def _run(model: SDXLModel, scheduler: str, seeds: list[int], recorder: TrajectoryRecorder | None, vae_slicing: bool,
         vae_tiling: bool, output_type: str = "pt", **kwargs) -> torch.Tensor:
    pipe = model.pipe
    sched = make_scheduler(scheduler, model.scheduler_config)
    if recorder is not None:
        recorder.watch(sched)
    with model.lock:
        pipe.scheduler = sched
        pipe.vae.enable_slicing() if vae_slicing else pipe.vae.disable_slicing()
        pipe.vae.enable_tiling() if vae_tiling else pipe.vae.disable_tiling()
        return pipe(generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds], output_type=output_type,
                    callback_on_step_end=recorder, **kwargs).images
