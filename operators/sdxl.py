"""Operator: generate SDXL text-to-image samples into a dataset (delegated by default, progress per image)."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_diffusion.brain.sdxl import DEFAULT_DATASET, generate_sdxl_samples
from fiftyone_diffusion.operators.common import heavy_config, run_with_progress
from fiftyone_diffusion.plugins.sdxl import DEFAULT_SDXL, PREVIEWS, SCHEDULERS


def _lines(value) -> list[str]:
    """Prompts / classes from the form: a list, or a text with one entry per line."""
    if value is None:
        return []
    items = value if isinstance(value, list | tuple) else str(value).splitlines()
    return [str(v).strip() for v in items if str(v).strip()]


class GenerateSdxlSamples(foo.Operator):
    @property
    def config(self):
        return heavy_config("generate_sdxl_samples", "Generate SDXL samples", icon="palette")

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.str("dataset", default=ctx.dataset.name if ctx.dataset else DEFAULT_DATASET, required=True,
                   label="Dataset", description="Name of the dataset to add the samples to (created if missing)")
        inputs.str("prompts", required=True, label="Prompts", description="One prompt per line")
        inputs.str("negative_prompt", label="Negative prompt")
        inputs.int("images_per_prompt", default=1, min=1, label="Images per prompt")
        inputs.int("seed", default=0, label="Seed", description="Image k of the run uses seed + k")
        inputs.int("steps", default=30, min=1, max=1000, label="Steps")
        inputs.float("guidance_scale", default=5.0, min=0.0, label="Guidance scale",
                     description="0 for sdxl-turbo")
        inputs.int("width", default=1024, min=64, max=2048, label="Width", description="A multiple of 8")
        inputs.int("height", default=1024, min=64, max=2048, label="Height", description="A multiple of 8")
        inputs.enum("scheduler", list(SCHEDULERS), default="euler", label="Scheduler")
        inputs.int("batch_size", default=1, min=1, label="Batch size")
        inputs.str("model", label="Model", description=f"Hub id or local pipeline folder; empty: {DEFAULT_SDXL}")
        inputs.str("refiner", label="Refiner", description="Optional SDXL refiner (hub id or folder)")
        inputs.float("refiner_start", default=0.8, min=0.0, max=1.0, label="Refiner starts at",
                     description="Share of the steps the base model runs")
        inputs.int("trajectory_steps", default=8, min=0, label="Trajectory frames")
        inputs.enum("trajectory_preview", list(PREVIEWS), default="latent", label="Trajectory preview",
                    description="latent: a cheap linear projection; vae: decode each frame")
        inputs.str("classes", label="Zero-shot classes", description="One class per line; needs a CLIP model")
        inputs.str("clip_model", label="CLIP model", description="Empty: no CLIP score or prediction")
        inputs.enum("precision", ["auto", "fp16", "bf16", "fp32"], default="auto", label="Precision")
        inputs.bool("cpu_offload", default=False, label="Model CPU offload")
        inputs.bool("vae_tiling", default=False, label="VAE tiling")
        inputs.enum("device", ["auto", "cpu", "cuda", "mps"], default="auto", label="Device")
        return types.Property(inputs, view=types.View(label="Generate SDXL samples"))

    def execute(self, ctx):
        p = ctx.params
        return run_with_progress(
            ctx, generate_sdxl_samples, "generated",
            dataset=p.get("dataset") or DEFAULT_DATASET, prompts=_lines(p.get("prompts")),
            negative_prompt=p.get("negative_prompt") or None, images_per_prompt=p.get("images_per_prompt", 1),
            seed=p.get("seed", 0), steps=p.get("steps", 30), guidance_scale=p.get("guidance_scale", 5.0),
            width=p.get("width", 1024), height=p.get("height", 1024), scheduler=p.get("scheduler", "euler"),
            batch_size=p.get("batch_size", 1), model=p.get("model") or None, device=p.get("device", "auto"),
            trajectory_steps=p.get("trajectory_steps", 8), trajectory_preview=p.get("trajectory_preview", "latent"),
            precision=p.get("precision", "auto"), cpu_offload=bool(p.get("cpu_offload")),
            vae_tiling=bool(p.get("vae_tiling")), classes=_lines(p.get("classes")) or None,
            clip=p.get("clip_model") or None, refiner=p.get("refiner") or None,
            refiner_start=p.get("refiner_start", 0.8),
        )
