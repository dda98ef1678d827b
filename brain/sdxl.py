"""Generate SDXL text-to-image samples straight into a FiftyOne dataset, each with its full recipe."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from fiftyone_diffusion.brain.generation import get_or_create_dataset
from fiftyone_diffusion.brain.media import atomic_save_image, check_writable_dir
from fiftyone_diffusion.errors import InputError
from fiftyone_diffusion.plugins.devices import resolve_device
from fiftyone_diffusion.plugins.sdxl import (
    PREVIEWS,
    SCHEDULERS,
    TrajectoryRecorder,
    generate,
    load_sdxl,
    resolve_precision,
)

DEFAULT_DATASET = "sdxl_generated_samples"
MAX_IMAGES = 10_000
MAX_STEPS = 1000
MIN_SIZE, MAX_SIZE = 64, 2048


ZERO_SHOT_SCALE = 100.0  # CLIP's logit scale (learned, clamped at 100) for zero-shot softmax


class ClipEmbedder(Protocol):
    """What the optional CLIP hook needs: FiftyOne's EmbeddingsMixin / PromptMixin methods."""

    def embed_all(self, images: list[np.ndarray]) -> np.ndarray: ...

    def embed_prompts(self, prompts: list[str]) -> np.ndarray: ...


class GenerationFailed(RuntimeError):
    """A run stopped half way; `result` says what was added and what failed (the cause is chained)."""

    def __init__(self, result: dict):
        self.result = result
        super().__init__(f"generation failed at {result['failed']} ({result['error']}); {result['created']} "
                         f"images were added to dataset {result['dataset']!r} (run_key {result['run_key']}), "
                         "the failed batch's files were removed")


def validate_sdxl_args(prompts, images_per_prompt: int, steps: int, guidance_scale: float, width: int, height: int,
                       scheduler: str, batch_size: int, trajectory_steps: int, trajectory_preview: str) -> list[str]:
    """Raise InputError for bad parameters, before anything is loaded or written; returns the prompt list."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = [str(p).strip() for p in (prompts or [])]
    if not prompts or not all(prompts):
        raise InputError("prompts must be a non-empty list of non-empty prompts")
    if not isinstance(images_per_prompt, int) or images_per_prompt <= 0:
        raise InputError(f"images_per_prompt must be a positive integer, got {images_per_prompt!r}")
    if len(prompts) * images_per_prompt > MAX_IMAGES:
        raise InputError(f"{len(prompts) * images_per_prompt} images is more than {MAX_IMAGES} per run; split it")
    if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise InputError(f"steps must be an integer in 1..{MAX_STEPS}, got {steps!r}")
    if guidance_scale is None or guidance_scale < 0:
        raise InputError(f"guidance_scale must be >= 0, got {guidance_scale}")
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value % 8 or not MIN_SIZE <= value <= MAX_SIZE:
            raise InputError(f"{name} must be a multiple of 8 in {MIN_SIZE}..{MAX_SIZE}, got {value!r}")
    if scheduler not in SCHEDULERS:
        raise InputError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if trajectory_steps < 0:
        raise InputError(f"trajectory_steps must be >= 0, got {trajectory_steps}")
    if trajectory_preview not in PREVIEWS:
        raise InputError(f"trajectory_preview must be one of {', '.join(PREVIEWS)}, got {trajectory_preview!r}")
    return prompts


def read_prompts_file(path: str) -> list[str]:
    """Prompts from a UTF-8 text file, one per line (blank lines and lines starting with # are skipped)."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except OSError as e:
        raise InputError(f"cannot read prompts file {path}: {e.strerror or e}") from None
    return [line for line in lines if line and not line.startswith("#")]


def _clip_outputs(clip: ClipEmbedder, images: np.ndarray, prompts: list[str], classes: list[str] | None):
    """Per image: cosine(prompt, image), and zero-shot probabilities over `classes` (or None)."""
    def unit(x) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.as_tensor(np.asarray(x)).float(), dim=-1)

    img = unit(clip.embed_all([Image.fromarray(a) for a in images]))
    scores = (img * unit(clip.embed_prompts(prompts))).sum(-1).tolist()
    if not classes:
        return scores, None
    return scores, ZERO_SHOT_SCALE * img @ unit(clip.embed_prompts([f"a photo of a {c}" for c in classes])).T


def _resolve_clip(clip, classes, device: str):
    """None, a CLIP model spec for `plugins.clip.load_clip_model`, or an object with embed_all / embed_prompts."""
    if classes and clip is None:
        raise InputError("classes were given but no CLIP model: pass clip=<a CLIP model> to label the images")
    if isinstance(clip, str):
        from fiftyone_diffusion.plugins.clip import load_clip_model

        clip = load_clip_model(clip, device=device)
    if clip is not None and not all(callable(getattr(clip, m, None)) for m in ("embed_all", "embed_prompts")):
        raise InputError("clip must be a CLIP model spec or provide embed_all(images) and embed_prompts(texts)")
    return clip


def generate_sdxl_samples(
    dataset,
    prompts: Sequence[str] | str,
    negative_prompt: str | None = None,
    images_per_prompt: int = 1,
    seed: int = 0,
    steps: int = 30,
    guidance_scale: float = 5.0,
    width: int = 1024,
    height: int = 1024,
    scheduler: str = "euler",
    batch_size: int = 1,
    model: str | None = None,
    refiner: str | None = None,
    device: str = "auto",
    trajectory_steps: int = 8,
    classes: Sequence[str] | None = None,
    media_dir: str | None = None,
    precision: str = "auto",
    trajectory_preview: str = "latent",
    cpu_offload: bool = False,
    vae_slicing: bool = False,
    vae_tiling: bool = False,
    refiner_start: float = 0.8,
    clip: str | ClipEmbedder | None = None,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Generate `images_per_prompt` images per prompt with an SDXL pipeline into `dataset` (a name or a Dataset).

    Image k of the run (prompt-major) uses seed `seed + k`; its `generation` field holds the whole recipe
    (see `regenerate_sdxl_sample`). `trajectory` holds K previews of x_t and of the predicted x_0.
    With a CLIP model (`clip=`: a spec for `plugins.clip.load_clip_model` or any FiftyOne embedding
    model with `embed_all` / `embed_prompts`), each image also gets `clip_score` (prompt-image cosine)
    and, given `classes`, a zero-shot `prediction` ("a photo of a {class}"). A run that fails half way
    keeps the samples whose images were written, removes the files of the failed batch, and raises
    `GenerationFailed`, whose message and `result` say what was added and what failed.
    """
    import fiftyone as fo

    prompts = validate_sdxl_args(prompts, images_per_prompt, steps, guidance_scale, width, height, scheduler,
                                 batch_size, trajectory_steps, trajectory_preview)
    if not 0.0 < refiner_start < 1.0:
        raise InputError(f"refiner_start must be in (0, 1) (the share of steps the base runs), got {refiner_start}")
    classes = [str(c) for c in classes] if classes else None
    clip = _resolve_clip(clip, classes, device)
    dev = resolve_device(device)
    resolve_precision(precision, dev)
    sdxl = load_sdxl(model, dev, precision, cpu_offload)
    refiner_model = load_sdxl(refiner, dev, precision, cpu_offload, refiner=True) if refiner else None
    name = dataset if isinstance(dataset, str) else dataset.name
    folder = check_writable_dir(media_dir or os.path.join(fo.config.default_dataset_dir, "fiftyone-diffusion", name))
    ds = get_or_create_dataset(dataset)

    jobs = [(p, seed + k) for k, p in enumerate(q for q in prompts for _ in range(images_per_prompt))]
    total = len(jobs)
    run_key = uuid.uuid4().hex[:8]
    created, written = 0, []
    bar = tqdm(total=total, desc="generate-sdxl", disable=not progress)
    try:
        for start in range(0, total, batch_size):
            batch_jobs = jobs[start : start + batch_size]
            batch_prompts, seeds = [p for p, _ in batch_jobs], [s for _, s in batch_jobs]
            recorder = TrajectoryRecorder(steps, min(trajectory_steps, steps), trajectory_preview)
            images = generate(sdxl, batch_prompts, seeds, negative_prompt, steps, guidance_scale, width, height,
                              scheduler, recorder if trajectory_steps else None, vae_slicing, vae_tiling,
                              refiner_model, refiner_start)
            scores, logits = _clip_outputs(clip, images, batch_prompts, classes) if clip else (None, None)
            now = datetime.now(timezone.utc)
            samples = []
            written.clear()
            for j, (prompt, s) in enumerate(batch_jobs):
                path = os.path.join(folder, f"{run_key}_{start + j:06d}.png")
                written.append(atomic_save_image(Image.fromarray(images[j]), path))
                fields = {"generation": fo.DynamicEmbeddedDocument(
                    model=sdxl.name, prompt=prompt, negative_prompt=negative_prompt, seed=s, steps=steps,
                    guidance_scale=float(guidance_scale), width=width, height=height, scheduler=scheduler,
                    refiner=refiner_model.name if refiner_model else None,
                    refiner_start=refiner_start if refiner_model else None, precision=sdxl.precision,
                    device=dev.type, batch_prompts=batch_prompts, batch_seeds=seeds, run_key=run_key, created_at=now,
                )}
                if trajectory_steps:
                    tpath = os.path.join(folder, "trajectories", f"{run_key}_{start + j:06d}.png")
                    written.append(atomic_save_image(Image.fromarray(recorder.strip(j)), tpath))
                    fields["trajectory"] = fo.DynamicEmbeddedDocument(**recorder.document(j, tpath))
                if scores is not None:
                    fields["clip_score"] = round(float(scores[j]), 5)
                if logits is not None:
                    probs = torch.softmax(logits[j], 0)
                    k = int(probs.argmax())
                    fields["prediction"] = fo.Classification(label=classes[k], confidence=float(probs[k]),
                                                             logits=logits[j].tolist())
                samples.append(fo.Sample(filepath=path, tags=["generated", "sdxl"], **fields))
            ds.add_samples(samples, progress=False)
            created += len(samples)
            written.clear()
            bar.update(len(samples))
            if on_progress:
                on_progress(created, total)
    except BaseException as e:
        for path in written:  # files of the batch that did not make it into the dataset
            if os.path.exists(path):
                os.remove(path)
        if not isinstance(e, Exception):  # KeyboardInterrupt & co. stay what they are
            raise
        result = {"dataset": ds.name, "created": created, "total": total, "run_key": run_key,
                  "failed": f"images {created + 1}..{min(created + batch_size, total)} of {total}",
                  "error": f"{e.__class__.__name__}: {e}"}
        raise GenerationFailed(result) from e
    finally:
        bar.close()
    return {"dataset": ds.name, "created": created, "total": total, "run_key": run_key, "media_dir": folder,
            "model": sdxl.name, "refiner": refiner_model.name if refiner_model else None, "scheduler": scheduler,
            "steps": steps, "device": dev.type, "precision": sdxl.precision}


def regenerate_sdxl_sample(sample_or_recipe, device: str = "auto", alone: bool = False) -> np.ndarray:
    """Regenerate one sample's image from its stored `generation` recipe (uint8 (H, W, 3)).

    Bit-identical on the same device and precision. Float kernels depend on the batch shape, so a
    sample that came out of a batch of several is regenerated by re-running its batch (stored as
    `batch_prompts` / `batch_seeds`); `alone=True` runs it by itself (identical up to float rounding).
    """
    recipe = sample_or_recipe["generation"] if hasattr(sample_or_recipe, "has_field") else sample_or_recipe
    get = recipe.get if isinstance(recipe, dict) else lambda k: getattr(recipe, k, None)
    prompts, seeds = get("batch_prompts"), get("batch_seeds")
    if alone or not seeds:
        prompts, seeds = [get("prompt")], [get("seed")]
    dev = resolve_device(device)
    sdxl = load_sdxl(get("model"), dev, get("precision") or "auto")
    refiner = load_sdxl(get("refiner"), dev, get("precision") or "auto", refiner=True) if get("refiner") else None
    images = generate(sdxl, prompts, seeds, get("negative_prompt"), get("steps"), get("guidance_scale"),
                      get("width"), get("height"), get("scheduler"), refiner=refiner,
                      refiner_start=get("refiner_start") or 0.8)
    return images[seeds.index(get("seed"))] if len(seeds) > 1 else images[0]
