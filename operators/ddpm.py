"""Operators: train the classifier and the DDPM, and generate DDPM samples into a dataset."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_diffusion.brain.generation import AUTO_GUIDE, DEFAULT_DATASET, RANDOM_LABEL, generate_ddpm_samples
from fiftyone_diffusion.brain.training import train_classifier, train_ddpm
from fiftyone_diffusion.operators.common import heavy_config, run_with_progress, target_input, target_view
from fiftyone_diffusion.plugins.ddpm import SAMPLERS


def _device_input(inputs: types.Object) -> None:
    inputs.enum("device", ["auto", "cpu", "cuda", "mps"], default="auto", label="Device")


class GenerateDdpmSamples(foo.Operator):
    @property
    def config(self):
        return heavy_config("generate_ddpm_samples", "Generate DDPM samples", icon="auto_awesome")

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.str("dataset", default=ctx.dataset.name if ctx.dataset else DEFAULT_DATASET, required=True,
                   label="Dataset", description="Name of the dataset to add the samples to (created if missing)")
        inputs.int("num_samples", default=16, required=True, min=1, label="Number of samples")
        inputs.str("model", label="Model", description="Empty: the shipped MNIST DDPM; or a DDPM folder / hub id")
        inputs.enum("sampler", list(SAMPLERS), default="dpmsolver++", label="Sampler")
        inputs.int("steps", default=20, min=1, max=1000, label="Steps")
        inputs.int("seed", default=0, label="Seed")
        inputs.int("label", label="Digit", description="Empty: unconditional")
        inputs.bool("random_label", default=False, label="Random digit per sample",
                    description="Each sample draws a digit from its seed and is guided to it")
        inputs.float("guidance_scale", default=3.0, min=0.0, label="Guidance scale")
        inputs.str("autoguide_model", default=AUTO_GUIDE, label="Autoguidance guide",
                   description="Unconditional samples: 'auto' (the model's recommended guide), 'none', or a "
                               "DDPM folder")
        inputs.float("autoguide_scale", min=0.0, label="Autoguidance scale",
                     description="Empty: the model's recommended scale")
        inputs.int("batch_size", default=64, min=1, label="Batch size")
        inputs.int("trajectory_steps", default=10, min=0, label="Trajectory frames")
        inputs.str("run_key", label="Resume run", description="Key of an interrupted run to complete")
        _device_input(inputs)
        return types.Property(inputs, view=types.View(label="Generate DDPM samples"))

    def execute(self, ctx):
        p = ctx.params
        return run_with_progress(
            ctx, generate_ddpm_samples, "generated",
            dataset=p.get("dataset") or DEFAULT_DATASET, num_samples=p.get("num_samples", 16),
            model=p.get("model") or None, sampler=p.get("sampler", "dpmsolver++"), steps=p.get("steps", 20),
            seed=p.get("seed", 0), label=RANDOM_LABEL if p.get("random_label") else p.get("label"),
            guidance_scale=p.get("guidance_scale", 3.0),
            autoguide_model=p.get("autoguide_model") or AUTO_GUIDE, autoguide_scale=p.get("autoguide_scale"),
            batch_size=p.get("batch_size", 64), device=p.get("device", "auto"),
            trajectory_steps=p.get("trajectory_steps", 10), run_key=p.get("run_key") or None,
        )


class TrainDdpm(foo.Operator):
    @property
    def config(self):
        return heavy_config("train_ddpm", "Train a DDPM", icon="model_training")

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.str("output_dir", required=True, label="Output folder",
                   description="A diffusers DDPM folder is written here; an existing run resumes")
        inputs.enum("source", ["MNIST", "DATASET"], default="DATASET" if ctx.dataset else "MNIST",
                    label="Train on", description="MNIST files, or this dataset's ground_truth labels")
        if ctx.params.get("source", "DATASET" if ctx.dataset else "MNIST") == "DATASET":
            target_input(ctx, inputs)
        inputs.str("data_dir", label="MNIST folder")
        inputs.int("steps", default=3000, min=1, label="Steps")
        inputs.int("batch_size", default=128, min=1, label="Batch size")
        inputs.int("checkpoint_every", default=250, min=1, label="Checkpoint every")
        inputs.str("init_from", label="Warm-start from",
                   description="Optional: ddpm-mnist or a DDPM folder written by train-ddpm")
        inputs.float("p_uncond", default=0.15, min=0.0, max=0.99, label="Label dropout",
                     description="Share of batches on the null class (unconditional samples, guidance)")
        _device_input(inputs)
        return types.Property(inputs, view=types.View(label="Train a DDPM"))

    def execute(self, ctx):
        p = ctx.params
        view = target_view(ctx) if p.get("source") == "DATASET" and ctx.dataset else None
        return run_with_progress(
            ctx, train_ddpm, "step", output_dir=p["output_dir"], data_dir=p.get("data_dir") or None, view=view,
            steps=p.get("steps", 3000), batch_size=p.get("batch_size", 128),
            checkpoint_every=p.get("checkpoint_every", 250), device=p.get("device", "auto"),
            init_from=p.get("init_from") or None, p_uncond=p.get("p_uncond", 0.15),
        )


class TrainClassifier(foo.Operator):
    @property
    def config(self):
        return heavy_config("train_classifier", "Train the digit classifier", icon="model_training")

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.str("output_dir", required=True, label="Output folder")
        inputs.str("data_dir", label="MNIST folder")
        inputs.int("epochs", default=4, min=1, label="Epochs")
        _device_input(inputs)
        return types.Property(inputs, view=types.View(label="Train the digit classifier"))

    def execute(self, ctx):
        p = ctx.params
        return run_with_progress(
            ctx, train_classifier, "step", output_dir=p["output_dir"], data_dir=p.get("data_dir") or None,
            epochs=p.get("epochs", 4), device=p.get("device", "auto"),
        )
