"""Panel `generation_overview`: predicted labels, confidence and generation recipes of the view."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types
from fiftyone import ViewField as F

from fiftyone_diffusion.brain.panel_data import generation_overview_data

LABELS_LAYOUT = {"height": 300, "width": 480, "margin": {"l": 50, "r": 20, "t": 40, "b": 40},
                 "title": {"text": "prediction.label"},
                 "xaxis": {"title": {"text": "label"}, "type": "category"}, "yaxis": {"title": {"text": "samples"}}}
CONFIDENCE_LAYOUT = {"height": 260, "width": 480, "margin": {"l": 50, "r": 20, "t": 40, "b": 40},
                     "title": {"text": "prediction.confidence"}, "xaxis": {"range": [0, 1]},
                     "yaxis": {"title": {"text": "samples"}}}


class GenerationOverviewPanel(foo.Panel):
    @property
    def config(self):
        return foo.PanelConfig(
            name="generation_overview", label="Generation overview", surfaces="grid", icon="bar_chart",
            help_markdown="Predicted labels, their confidence and the generation recipes of the current view. "
                          "Click a bar to show only that label.",
        )

    def on_load(self, ctx):
        self._refresh(ctx)

    def on_change_view(self, ctx):
        self._refresh(ctx)

    def on_change_dataset(self, ctx):
        self._refresh(ctx)

    def on_label_click(self, ctx):
        label = ctx.params.get("x")
        if label is None or ctx.dataset is None:
            return
        ctx.panel.state.filtered_label = str(label)
        ctx.ops.set_view(ctx.dataset.match(F("prediction.label") == str(label)))

    def show_all(self, ctx):
        ctx.panel.state.filtered_label = None
        ctx.ops.clear_view()

    def _refresh(self, ctx):
        d = generation_overview_data(ctx.view) if ctx.dataset is not None else {"total": 0, "labels": None,
                                                                                  "confidence": None, "recipes": []}
        labels, confidence = d["labels"], d["confidence"]
        if not d["total"]:
            message = "The view is empty."
        elif labels is None:
            message = f"No sample of the {d['total']} in the view has a `prediction` label."
        else:
            message = f"{sum(labels['y'])} of {d['total']} samples have a predicted label."
        ctx.panel.state.set({"message": message, "has_labels": labels is not None,
                             "has_confidence": confidence is not None, "recipes": d["recipes"]})
        ctx.panel.data.set({
            "labels_plot": [{"type": "bar", "x": labels["x"], "y": labels["y"], "name": "samples",
                             "marker": {"color": "#ff6d04"}}] if labels else [],
            "confidence_plot": [{"type": "bar", "x": confidence["x"], "y": confidence["y"],
                                 "width": confidence["width"], "name": "samples"}] if confidence else [],
        })

    def render(self, ctx):
        s = ctx.panel.state
        panel = types.Object()
        panel.md(s.message or "", name="message")
        if s.filtered_label is not None:
            panel.btn("show_all", label=f"Showing label {s.filtered_label}: show all", on_click=self.show_all)
        if s.has_labels:
            panel.plot("labels_plot", layout=LABELS_LAYOUT, on_click=self.on_label_click,
                       config={"displayModeBar": False})
        if s.has_confidence:
            panel.plot("confidence_plot", layout=CONFIDENCE_LAYOUT, config={"displayModeBar": False})
        if s.recipes:
            table = types.TableView()
            for key, label in (("model", "Model"), ("sampler", "Sampler"), ("steps", "Steps"),
                               ("guidance", "Guidance"), ("count", "Samples")):
                table.add_column(key, label=label)
            panel.list("recipes", types.Object(), view=table, label="Generation recipes")
        return types.Property(panel, view=types.GridView(orientation="vertical", align_x="left", gap=2, padding=2))
