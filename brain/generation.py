"""Generate DDPM samples straight into a FiftyOne dataset, with recipe, trajectory and prediction."""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Callable
from datetime import datetime, timezone

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from fiftyone_diffusion.brain.media import atomic_save_image, check_writable_dir
from fiftyone_diffusion.errors import InputError, add_note
from fiftyone_diffusion.plugins.classifier import DigitClassifier, classify
from fiftyone_diffusion.plugins.ddpm import (
    MAX_STEPS,
    SAMPLERS,
    DDPMModel,
    StepRecord,
    check_guide,
    load_ddpm,
    sample,
)
from fiftyone_diffusion.plugins.devices import fast_dtype, resolve_device

DEFAULT_DATASET = "ddpm_mnist_generated_samples"
MAX_SAMPLES = 100_000
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """[0, 1] floats (N, C, H, W) -> uint8 (N, H, W) or (N, H, W, 3)."""
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return arr[:, 0] if arr.shape[1] == 1 else arr.transpose(0, 2, 3, 1)


def _pil(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr, mode="L" if arr.ndim == 2 else "RGB")


class _TrajectoryRecorder:
    """Keeps K evenly spaced frames (x_t, predicted x_0) and per-step statistics of a batch."""

    def __init__(self, steps: int, frames: int, crop: int | None):
        self.keep = sorted({int(round(v)) for v in np.linspace(0, steps - 1, frames)}) if frames else []
        self.crop = crop
        self.xt, self.x0, self.timesteps, self.all_timesteps = [], [], [], []
        self.pixel_std, self.eps_norm = [], []

    def _frame(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x.float().clamp(-1, 1) + 1) / 2).cpu()
        if self.crop and self.crop < x.shape[-1]:
            off = (x.shape[-1] - self.crop) // 2
            x = x[..., off : off + self.crop, off : off + self.crop]
        return x

    def __call__(self, rec: StepRecord) -> None:
        dims = tuple(range(1, rec.xt.ndim))
        self.all_timesteps.append(rec.timestep)
        self.pixel_std.append(rec.xt.float().std(dim=dims).cpu())
        self.eps_norm.append(rec.eps.float().pow(2).mean(dim=dims).sqrt().cpu())
        if rec.index in self.keep:
            self.timesteps.append(rec.timestep)
            self.xt.append(self._frame(rec.xt))
            self.x0.append(self._frame(rec.x0))

    def strip(self, i: int) -> np.ndarray:
        """Sample i's frames as one image: x_t on the top row, predicted x_0 below."""
        rows = [torch.cat([f[i] for f in frames], dim=-1) for frames in (self.xt, self.x0)]
        return _to_uint8(torch.cat(rows, dim=-2)[None])[0]

    def document(self, i: int, path: str) -> dict:
        return {
            "frames_path": path,
            "num_frames": len(self.timesteps),
            "step_indices": self.keep,
            "timesteps": self.timesteps,
            "all_timesteps": self.all_timesteps,
            "pixel_std": [round(float(v[i]), 5) for v in self.pixel_std],
            "eps_norm": [round(float(v[i]), 5) for v in self.eps_norm],
        }


def validate_generation_args(num_samples: int, sampler: str, steps: int, guidance_scale: float, batch_size: int,
                             trajectory_steps: int) -> None:
    """Raise InputError for bad parameters, before anything is loaded or written."""
    if not isinstance(num_samples, int) or num_samples <= 0:
        raise InputError(f"num_samples must be a positive integer, got {num_samples!r}")
    if num_samples > MAX_SAMPLES:
        raise InputError(f"num_samples={num_samples} is more than {MAX_SAMPLES} per run; split it into runs")
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise InputError(f"steps must be an integer in 1..{MAX_STEPS}, got {steps!r}")
    if guidance_scale < 0:
        raise InputError(f"guidance_scale must be >= 0, got {guidance_scale}")
    if batch_size <= 0:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    if trajectory_steps < 0:
        raise InputError(f"trajectory_steps must be >= 0, got {trajectory_steps}")


RANDOM_LABEL = "random"


def _resolve_label(model: DDPMModel, label) -> int | None:
    """The class index of `label`; None for unconditional; RANDOM_LABEL is checked, resolved per sample."""
    if label is None or label == "":
        return None
    if not model.conditional:
        raise InputError(f"model {model.name!r} is unconditional: it cannot generate label {label!r}")
    try:
        index = model.classes.index(str(label))
    except ValueError:
        if label == RANDOM_LABEL:
            return None
        raise InputError(f"label {label!r} is not one of the model's classes {model.classes}, "
                         f"nor {RANDOM_LABEL!r}") from None
    return index


def drawn_label(seed: int, num_classes: int) -> int:
    """The class a `label="random"` sample draws: uniform, from its own seed (independent of its noise)."""
    return int(np.random.default_rng([int(seed), 0x1ABE1]).integers(num_classes))


def batch_labels(model: DDPMModel, seeds: list[int], label=None) -> list[int | None]:
    """The class index each seed samples: `label` for all of them, or, for RANDOM_LABEL, one drawn per seed."""
    if label == RANDOM_LABEL:
        _resolve_label(model, label)  # checks the model is class-conditional
        return [drawn_label(s, len(model.classes)) for s in seeds]
    return [_resolve_label(model, label)] * len(seeds)


AUTO_GUIDE = "auto"
DEFAULT_AUTOGUIDE_SCALE = 2.0


def resolve_autoguide(ddpm: DDPMModel, autoguide_model: str | None, autoguide_scale: float | None,
                      unconditional: bool, device) -> tuple[DDPMModel | None, float | None]:
    """The guide model and scale for autoguidance of unconditional samples; (None, None) when off.

    `autoguide_model="auto"` takes the guide the model's `fiftyone_diffusion.json` recommends under
    `autoguidance` (`{"guide": name or folder, "scale": w}`), if any; None or "none" turns it off.
    """
    if autoguide_scale is not None and autoguide_scale < 0:
        raise InputError(f"autoguide_scale must be >= 0, got {autoguide_scale}")
    if autoguide_model in (None, "", "none"):
        return None, None
    if not unconditional and (autoguide_model != AUTO_GUIDE or autoguide_scale is not None):
        raise InputError("autoguidance applies to unconditional samples (label=None); a class label is guided "
                         "by classifier-free guidance (guidance_scale)")
    recommended = ddpm.extra.get("autoguidance") or {}
    if autoguide_model == AUTO_GUIDE:
        if not unconditional:
            return None, None
        if not recommended.get("guide"):
            if autoguide_scale is not None:
                raise InputError(f"model {ddpm.name!r} recommends no autoguidance guide: name one with "
                                 "autoguide_model to use autoguide_scale")
            return None, None
        name = recommended["guide"]
        if not os.path.isabs(name) and os.path.isdir(os.path.join(ddpm.name, name)):
            name = os.path.join(ddpm.name, name)  # a guide stored next to (or inside) a model folder
    else:
        name = autoguide_model
    scale = autoguide_scale if autoguide_scale is not None else recommended.get("scale", DEFAULT_AUTOGUIDE_SCALE)
    guide = load_ddpm(name, device)
    check_guide(ddpm, guide)
    return (None, None) if scale == 1.0 else (guide, float(scale))


def get_or_create_dataset(dataset):
    """A Dataset given as itself or by name; a new name creates a persistent dataset."""
    import fiftyone as fo

    if isinstance(dataset, str):
        if not dataset.strip():
            raise InputError("dataset name is empty")
        if fo.dataset_exists(dataset):
            return fo.load_dataset(dataset)
        ds = fo.Dataset(dataset)
        ds.persistent = True
        return ds
    return dataset


def generate_ddpm_samples(
    dataset=DEFAULT_DATASET,
    num_samples: int = 16,
    model: str | None = None,
    sampler: str = "dpmsolver++",
    steps: int = 20,
    seed: int = 0,
    label: int | str | None = None,
    guidance_scale: float = 3.0,
    batch_size: int = 64,
    device: str = "auto",
    trajectory_steps: int = 10,
    media_dir: str | None = None,
    classify_samples: bool | None = None,
    precision: str = "auto",
    run_key: str | None = None,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    autoguide_model: str | None = AUTO_GUIDE,
    autoguide_scale: float | None = None,
) -> dict:
    """Sample `num_samples` images from a DDPM into `dataset` (a name or a Dataset).

    Samples are added batch by batch, so a crash loses at most the batch in flight. Passing the
    `run_key` of an earlier, interrupted run resumes it: the missing samples are generated, none
    twice, and that run's files that never made it into the dataset are removed. On a CUDA
    out-of-memory error the batch size halves and the batch is retried (the result says which
    batch size was used).

    `label`: a class, None (unconditional: the model's null class, no guidance) or "random" (each
    sample draws a class uniformly from its own seed, stored as its `label`, and is guided to it).

    Unconditional samples use autoguidance when the model recommends a guide (the shipped model
    does: `ddpm-mnist-guide`) or `autoguide_model` names one; `autoguide_model=None` turns it off.

    Sample i uses seed `seed + i`; its `generation` field holds the whole recipe (batch size included),
    so it alone regenerates bit-identically on the same device (`regenerate_ddpm_sample`). Digit models
    also get a `prediction` from the shipped classifier (`classify_samples=None`: when the model makes digits).
    """
    import fiftyone as fo

    validate_generation_args(num_samples, sampler, steps, guidance_scale, batch_size, trajectory_steps)
    if precision not in ("auto", *PRECISIONS):
        raise InputError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    dev = resolve_device(device)
    dtype = PRECISIONS.get(precision) or fast_dtype(dev)
    if dtype == torch.float16:
        dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    precision_name = {v: k for k, v in PRECISIONS.items()}[dtype]
    ddpm = load_ddpm(model, dev)
    label_index = _resolve_label(ddpm, label)
    random_label = label == RANDOM_LABEL
    guided = random_label or label_index is not None
    guide, guide_scale = resolve_autoguide(ddpm, autoguide_model, autoguide_scale, not guided, dev)
    do_classify = ddpm.is_digit_model if classify_samples is None else classify_samples
    classifier = DigitClassifier.load() if do_classify else None
    ds = get_or_create_dataset(dataset)
    folder = media_dir or os.path.join(fo.config.default_dataset_dir, "fiftyone-diffusion", ds.name)
    folder = check_writable_dir(folder)

    run_key = run_key or uuid.uuid4().hex[:8]
    recipe = {"model": ddpm.name, "sampler": sampler, "steps": steps,
              "label": RANDOM_LABEL if random_label else None if label_index is None else ddpm.classes[label_index],
              "guidance_scale": float(guidance_scale) if guided else None,
              "autoguide_model": guide.name if guide else None, "autoguide_scale": guide_scale,
              "precision": precision_name, "device": dev.type, "run_key": run_key}
    done = resume_run(ds, folder, run_key, recipe, seed)
    pending = (i for i in range(num_samples) if i not in done)  # lazy: memory is flat in num_samples
    queue: list[int] = []  # at most one batch of indices, kept for the retry after an OOM
    created = 0
    written: list[str] = []
    already = sum(1 for i in done if i < num_samples)
    bar = tqdm(total=num_samples, initial=already, desc="generate-ddpm", disable=not progress)
    try:
        while True:
            queue += itertools.islice(pending, max(0, batch_size - len(queue)))
            if not queue:
                break
            indices = queue[:batch_size]
            seeds = [seed + i for i in indices]
            labels = batch_labels(ddpm, seeds, label)
            recorder = _TrajectoryRecorder(steps, min(trajectory_steps, steps), ddpm.image_size)
            try:
                images = sample(ddpm, seeds, sampler, steps, labels, guidance_scale, dev, dtype,
                                on_step=recorder if trajectory_steps else None, guide=guide,
                                guide_scale=guide_scale or 1.0)
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size = max(1, batch_size // 2)  # retry this batch, halved
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            arrays = _to_uint8(images)
            logits = classify(classifier, images)[0] if classifier is not None else None
            now = datetime.now(timezone.utc)
            batch = []
            written.clear()
            for j, (i, s) in enumerate(zip(indices, seeds, strict=True)):
                path = os.path.join(folder, f"{run_key}_{i:06d}.png")
                written.append(atomic_save_image(_pil(arrays[j]), path))
                drawn = {"label": ddpm.classes[labels[j]], "label_drawn": True} if random_label else {}
                fields = {"generation": fo.DynamicEmbeddedDocument(**{**recipe, **drawn}, seed=s, index=i,
                                                                   batch_size=len(indices), created_at=now)}
                if trajectory_steps:
                    tpath = os.path.join(folder, "trajectories", f"{run_key}_{i:06d}.png")
                    written.append(atomic_save_image(_pil(recorder.strip(j)), tpath))
                    fields["trajectory"] = fo.DynamicEmbeddedDocument(**recorder.document(j, tpath))
                if logits is not None:
                    probs = torch.softmax(logits[j], 0)
                    k = int(probs.argmax())
                    fields["prediction"] = fo.Classification(
                        label=str(k), confidence=float(probs[k]), logits=logits[j].tolist()
                    )
                batch.append(fo.Sample(filepath=path, tags=["generated"], **fields))
            ds.add_samples(batch, progress=False)
            created += len(batch)
            written.clear()
            del queue[: len(indices)]
            bar.update(len(batch))
            if on_progress:
                on_progress(already + created, num_samples)
    except BaseException as e:
        for path in written:  # files of the batch that did not make it into the dataset
            if os.path.exists(path):
                os.remove(path)
        add_note(e, f"{already + created} of {num_samples} samples of run_key {run_key!r} are in dataset "
                    f"{ds.name!r}; the interrupted batch left no files. Resume with run_key={run_key!r}")
        raise
    finally:
        bar.close()
    return {"dataset": ds.name, "created": created, "resumed": len(done), "run_key": run_key, "media_dir": folder,
            "model": ddpm.name, "sampler": sampler, "steps": steps, "device": dev.type, "batch_size": batch_size,
            "autoguide_model": recipe["autoguide_model"], "autoguide_scale": guide_scale}


def resume_run(ds, folder: str, run_key: str, recipe: dict, seed: int) -> set[int]:
    """Indices of `run_key` already in the dataset; removes that run's files that are not in it.

    A run killed at any point (even kill -9) resumes from here with no duplicates and no orphans.
    """
    from fiftyone import ViewField as F

    view = ds.match(F("generation.run_key") == run_key)
    done: set[int] = set()
    if len(view):
        first = view.first().generation
        for key, value in recipe.items():
            stored = getattr(first, key, None)
            if key == "label" and getattr(first, "label_drawn", False):
                stored = RANDOM_LABEL
            if stored != value:
                raise InputError(f"run_key {run_key!r} was started with {key}={stored!r}, not {value!r}")
        if first.seed - first.index != seed:
            raise InputError(f"run_key {run_key!r} was started with seed={first.seed - first.index}, not {seed}")
        done = set(view.values("generation.index"))
    keep = set(view.values("filepath"))
    if view.has_field("trajectory"):
        keep |= set(p for p in view.values("trajectory.frames_path") if p)
    for sub in (folder, os.path.join(folder, "trajectories")):
        if not os.path.isdir(sub):
            continue
        for name in os.listdir(sub):
            path = os.path.join(sub, name)
            ours = name.startswith(f"{run_key}_") or name.startswith(f".tmp-{run_key}_")
            if ours and path not in keep:
                os.remove(path)
    return done


def regenerate_ddpm_sample(sample_or_recipe, device: str = "auto", media_path: str | None = None) -> np.ndarray:
    """Regenerate one sample's image from its stored `generation` recipe (uint8 array).

    Low-precision kernels (bf16 on CPU, GPUs) round differently for different batch shapes, though not
    for different batch mates: the sample is regenerated in a batch of its original size (copies of
    itself), so its image is bit-identical at any precision.
    """
    recipe = sample_or_recipe["generation"] if hasattr(sample_or_recipe, "has_field") else sample_or_recipe
    get = recipe.get if isinstance(recipe, dict) else lambda k: getattr(recipe, k, None)
    dev = resolve_device(device)
    ddpm = load_ddpm(get("model"), dev)
    label = _resolve_label(ddpm, get("label"))
    dtype = PRECISIONS[get("precision") or "fp32"]
    guidance = get("guidance_scale") or 1.0
    guide = load_ddpm(get("autoguide_model"), dev) if get("autoguide_model") else None
    copies = get("batch_size") or 1
    images = sample(ddpm, [get("seed")] * copies, get("sampler"), get("steps"), [label] * copies, guidance, dev,
                    dtype, guide=guide, guide_scale=get("autoguide_scale") or 1.0)[:1]
    return _to_uint8(images)[0]
