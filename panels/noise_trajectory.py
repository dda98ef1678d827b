"""Panel `noise_trajectory`: forward noising, the recorded reverse trajectory and the noise schedule."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_diffusion.brain.panel_data import SCHEDULE_LAYOUT, STATS_LAYOUT, noise_trajectory_data, sample_schedule
from fiftyone_diffusion.brain.trajectory import DEFAULT_LEVELS, compute_forward_trajectory, parse_levels
from fiftyone_diffusion.errors import InputError

DEFAULT_LEVELS_TEXT = ", ".join(f"{v:g}" for v in DEFAULT_LEVELS)


def current_sample_id(ctx) -> str | None:
    """The sample in the modal; in the grid, the first selected sample, else the first of the view."""
    if ctx.current_sample:
        return ctx.current_sample
    if ctx.selected:
        return ctx.selected[0]
    if ctx.view is None:
        return None
    ids = ctx.view.limit(1).values("id")
    return ids[0] if ids else None


class NoiseTrajectoryPanel(foo.Panel):
    @property
    def config(self):
        return foo.PanelConfig(
            name="noise_trajectory", label="Noise trajectory", surfaces="grid modal", icon="blur_on",
            help_markdown="Forward noising q(x_t | x_0), the recorded reverse trajectory and the noise schedule "
                          "of the current sample (grid: the first selected sample, else the first in the view).",
        )

    def on_load(self, ctx):
        ctx.panel.state.levels = ctx.panel.state.levels or DEFAULT_LEVELS_TEXT
        self._refresh(ctx, step=None)

    def on_change_current_sample(self, ctx):
        self._refresh(ctx, step=None)

    def on_change_selected(self, ctx):
        self._refresh(ctx, step=None)

    def on_change_view(self, ctx):
        self._refresh(ctx, step=None)

    def on_change_step(self, ctx):
        value = ctx.params.get("value")
        self._refresh(ctx, step=int(value) if value is not None else ctx.panel.state.step)

    def on_change_levels(self, ctx):
        ctx.panel.state.levels = ctx.params.get("value") or DEFAULT_LEVELS_TEXT

    def compute_forward(self, ctx):
        sample_id = current_sample_id(ctx)
        if sample_id is None:
            return
        try:
            levels = parse_levels(ctx.panel.state.levels or DEFAULT_LEVELS_TEXT)
            compute_forward_trajectory(ctx.dataset.select(sample_id), noise_levels=levels,
                                       schedule=sample_schedule(ctx.dataset[sample_id]).name, progress=False)
        except InputError as e:
            ctx.panel.state.message = f"Could not compute the forward trajectory: {e}"
            ctx.ops.notify(str(e), variant="error")
            return
        self._refresh(ctx, step=ctx.panel.state.step)

    def _refresh(self, ctx, step):
        sample_id = current_sample_id(ctx) if ctx.dataset is not None else None
        if sample_id is None:
            ctx.panel.state.set({"sample_id": None, "has_sample": False, "has_forward": False, "has_reverse": False,
                                 "message": "No sample to show: the view is empty."})
            ctx.panel.data.set({"plots": {"schedule_plot": [], "stats_plot": []}})
            return
        d = noise_trajectory_data(ctx.dataset[sample_id], step)
        fwd, rev = d["forward"], d["reverse"]
        state = {"sample_id": sample_id, "has_sample": True, "has_forward": fwd is not None,
                 "has_reverse": rev is not None, "message": d["message"]}
        if fwd:
            state.update(num_forward=len(fwd["frames"]), forward_caption=fwd["caption"],
                         forward_frames={f"f{i}": url for i, url in enumerate(fwd["frames"])})
        if rev:
            state.update(step=rev["step"], num_reverse=rev["num_frames"], reverse_caption=rev["caption"],
                         reverse_frames={"xt": rev["xt"], "x0": rev["x0"]}, reverse_strip=rev["strip"])
        ctx.panel.state.set(state)
        ctx.panel.data.set({"plots": {"schedule_plot": d["schedule_plot"], "stats_plot": d["stats_plot"] or []}})

    def render(self, ctx):
        s = ctx.panel.state
        panel = types.Object()
        if s.message:
            panel.md(s.message, name="message")
        if s.has_reverse:
            panel.md(f"**{s.reverse_caption}**", name="reverse_title")
            panel.int("step", label="Step", view=types.SliderView(label="Step"), min=0,
                      max=max(0, (s.num_reverse or 1) - 1), multipleOf=1, on_change=self.on_change_step)
            pair = panel.h_stack("reverse_frames", align_x="left", gap=2)
            pair.view("xt", types.ImageView(width="168px", height="168px", alt="x_t"))
            pair.view("x0", types.ImageView(width="168px", height="168px", alt="predicted x_0"))
            panel.md("All recorded frames: x_t (top row), predicted x_0 (bottom row)", name="strip_title")
            panel.view("reverse_strip", types.ImageView(width="560px", alt="reverse trajectory strip"))
        if s.has_sample:
            plots = panel.h_stack("plots", align_x="left", gap=2)
            plots.plot("schedule_plot", layout=SCHEDULE_LAYOUT, config={"displayModeBar": False})
            if s.has_reverse:
                plots.plot("stats_plot", layout=STATS_LAYOUT, config={"displayModeBar": False})
        if s.has_sample and s.has_forward:
            panel.md(f"**{s.forward_caption}**", name="forward_title")
            row = panel.h_stack("forward_frames", align_x="left", gap=1)
            for i in range(s.num_forward or 0):
                row.view(f"f{i}", types.ImageView(width="96px", height="96px", alt=f"forward frame {i}"))
        if s.has_sample:
            panel.str("levels", label="Noise levels (fractions of T)", default=DEFAULT_LEVELS_TEXT,
                      on_change=self.on_change_levels)
            panel.btn("compute_forward", label="Compute forward trajectory" if not s.has_forward else
                      "Recompute forward trajectory", on_click=self.compute_forward, variant="contained")
        return types.Property(panel, view=types.GridView(orientation="vertical", align_x="left", gap=2, padding=2))
