"""Operators: CLIP embeddings, similarity index, text search, zero-shot labels and digit-CLIP training."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_diffusion.brain.clip import (
    DEFAULT_BRAIN_KEY,
    build_similarity_index,
    compute_clip_embeddings,
    search,
    zero_shot_classify,
)
from fiftyone_diffusion.brain.clip_training import train_clip
from fiftyone_diffusion.operators.common import heavy_config, require, run_with_progress, target_input, target_view

MODEL_HELP = "digit-clip, open_clip:<name> (+ pretrained), an open_clip/transformers folder, or a hub id"


def _model_inputs(inputs: types.Object) -> None:
    inputs.str("model", default="digit-clip", label="Model", description=MODEL_HELP)
    inputs.str("pretrained", label="open_clip pretrained", description="A pretrained tag or a checkpoint path")
    inputs.int("batch_size", default=64, min=1, label="Batch size")


def _common(p: dict) -> dict:
    return {"model": p.get("model") or "digit-clip", "pretrained": p.get("pretrained") or None,
            "batch_size": p.get("batch_size") or 64}


class ComputeClipEmbeddings(foo.Operator):
    @property
    def config(self):
        return heavy_config("compute_clip_embeddings", "Compute CLIP embeddings", icon="scatter_plot")

    def resolve_input(self, ctx):
        inputs = types.Object()
        target_input(ctx, inputs)
        _model_inputs(inputs)
        inputs.str("embeddings_field", default="clip_embeddings", required=True, label="Embeddings field")
        inputs.bool("skip_existing", default=True, label="Only samples without an embedding")
        return types.Property(inputs, view=types.View(label="Compute CLIP embeddings"))

    def execute(self, ctx):
        p = ctx.params
        return run_with_progress(ctx, compute_clip_embeddings, "embedded", view=target_view(ctx),
                                 embeddings_field=p.get("embeddings_field") or "clip_embeddings",
                                 skip_existing=p.get("skip_existing", True), **_common(p))


class BuildSimilarityIndex(foo.Operator):
    @property
    def config(self):
        return heavy_config("build_similarity_index", "Build a CLIP similarity index", icon="image_search")

    def resolve_input(self, ctx):
        inputs = types.Object()
        target_input(ctx, inputs)
        _model_inputs(inputs)
        inputs.str("brain_key", default=DEFAULT_BRAIN_KEY, required=True, label="Brain key")
        inputs.enum("backend", ["sklearn", "lancedb", "qdrant", "milvus", "redis", "mongodb", "elasticsearch",
                                "pgvector", "pinecone"], default="sklearn", label="Backend",
                    description="Server backends use their usual FiftyOne brain config")
        inputs.str("embeddings_field", default="clip_embeddings", required=True, label="Embeddings field")
        return types.Property(inputs, view=types.View(label="Build a CLIP similarity index"))

    def execute(self, ctx):
        p = ctx.params
        return run_with_progress(ctx, build_similarity_index, "embedded", view=target_view(ctx),
                                 brain_key=p.get("brain_key") or DEFAULT_BRAIN_KEY, backend=p.get("backend", "sklearn"),
                                 embeddings_field=p.get("embeddings_field") or "clip_embeddings", **_common(p))


class Search(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(name="search", label="CLIP text search", icon="search",
                                  allow_immediate_execution=True)

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.str("text", required=True, label="Text", description='e.g. "a handwritten seven"')
        inputs.int("k", default=25, min=1, label="Number of results")
        keys = ctx.dataset.list_brain_runs(type="similarity") if ctx.dataset else []
        if keys:
            inputs.enum("brain_key", keys, default=DEFAULT_BRAIN_KEY if DEFAULT_BRAIN_KEY in keys else keys[0],
                        label="Similarity index")
        return types.Property(inputs, view=types.View(label="CLIP text search"))

    def execute(self, ctx):
        p = ctx.params
        view = search(ctx.view, require(p.get("text"), "enter a search text"), k=p.get("k", 25),
                      brain_key=p.get("brain_key") or None)
        ctx.ops.set_view(view=view)
        return {"results": len(view)}


class ZeroShotClassify(foo.Operator):
    @property
    def config(self):
        return heavy_config("zero_shot_classify", "Zero-shot classify with CLIP", icon="label")

    def resolve_input(self, ctx):
        inputs = types.Object()
        target_input(ctx, inputs)
        inputs.str("classes", default="0,1,2,3,4,5,6,7,8,9", required=True, label="Classes",
                   description="Comma-separated class names")
        inputs.str("templates", label="Templates", description="Comma-separated, e.g. 'a photo of a {c}'; "
                   "empty: the built-in ensemble")
        inputs.float("temperature", label="Temperature", description="Empty: the model's learned temperature")
        inputs.str("label_field", default="prediction", required=True, label="Label field")
        inputs.bool("store_logits", default=True, label="Store logits")
        _model_inputs(inputs)
        return types.Property(inputs, view=types.View(label="Zero-shot classify with CLIP"))

    def execute(self, ctx):
        p = ctx.params
        split = lambda s: [c.strip() for c in (s or "").split(",") if c.strip()]  # noqa: E731
        return run_with_progress(ctx, zero_shot_classify, "classified", view=target_view(ctx),
                                 classes=split(p.get("classes")), templates=split(p.get("templates")) or None,
                                 temperature=p.get("temperature") or None,
                                 label_field=p.get("label_field") or "prediction",
                                 store_logits=p.get("store_logits", True), **_common(p))


class TrainClip(foo.Operator):
    @property
    def config(self):
        return heavy_config("train_clip", "Train a digit-CLIP", icon="model_training")

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.str("output_dir", required=True, label="Output folder", description="An open_clip local-dir folder")
        inputs.enum("source", ["MNIST", "DATASET"], default="DATASET" if ctx.dataset else "MNIST",
                    label="Train on", description="MNIST files, or this dataset's ground_truth labels")
        if ctx.params.get("source", "DATASET" if ctx.dataset else "MNIST") == "DATASET":
            target_input(ctx, inputs)
        inputs.str("data_dir", label="MNIST folder")
        inputs.int("steps", default=2000, min=1, label="Steps")
        inputs.int("batch_size", default=256, min=2, label="Batch size")
        inputs.enum("device", ["auto", "cpu", "cuda", "mps"], default="auto", label="Device")
        return types.Property(inputs, view=types.View(label="Train a digit-CLIP"))

    def execute(self, ctx):
        p = ctx.params
        view = target_view(ctx) if p.get("source") == "DATASET" and ctx.dataset else None
        return run_with_progress(ctx, train_clip, "step", output_dir=p["output_dir"],
                                 data_dir=p.get("data_dir") or None, view=view, steps=p.get("steps", 2000),
                                 batch_size=p.get("batch_size", 256), device=p.get("device", "auto"))
