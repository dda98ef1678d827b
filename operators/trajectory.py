"""Operator: store a forward-noising trajectory for each sample of a view."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_diffusion.brain.trajectory import compute_forward_trajectory, parse_levels
from fiftyone_diffusion.operators.common import heavy_config, run_with_progress, target_input, target_view


class ComputeForwardTrajectory(foo.Operator):
    @property
    def config(self):
        return heavy_config("compute_forward_trajectory", "Compute forward-diffusion trajectories", icon="blur_on")

    def resolve_input(self, ctx):
        inputs = types.Object()
        target_input(ctx, inputs)
        inputs.str("noise_levels", default="0, 0.2, 0.4, 0.6, 0.8, 1", label="Noise levels",
                   description="Comma-separated fractions of T in [0, 1]")
        inputs.enum("schedule", ["linear", "cosine"], default="cosine", label="Schedule")
        inputs.int("seed", default=0, label="Seed")
        inputs.str("vae", label="VAE folder", description="Empty: pixel space; or a diffusers AutoencoderKL folder")
        inputs.int("max_size", default=256, min=8, label="Max image size")
        return types.Property(inputs, view=types.View(label="Compute forward-diffusion trajectories"))

    def execute(self, ctx):
        p = ctx.params
        return run_with_progress(
            ctx, compute_forward_trajectory, "samples", view=target_view(ctx),
            noise_levels=parse_levels(p.get("noise_levels") or "0, 0.2, 0.4, 0.6, 0.8, 1"),
            schedule=p.get("schedule") or "linear", seed=p.get("seed") or 0, vae=p.get("vae") or None,
            max_size=p.get("max_size") or 256,
        )
