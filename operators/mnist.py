"""Operator: load MNIST into a dataset."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_diffusion.brain.mnist import load_mnist


class LoadMnist(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="load_mnist", label="Load MNIST", allow_immediate_execution=True, allow_delegated_execution=True
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.str("dataset_name", default="mnist", required=True, label="Dataset name")
        inputs.enum("split", ["test", "train"], default="test", label="Split")
        inputs.int("max_samples", label="Max samples", description="Empty: the whole split")
        inputs.str("data_dir", label="Data dir", description="Folder with the four MNIST IDX files")
        return types.Property(inputs, view=types.View(label="Load MNIST"))

    def execute(self, ctx):
        p = ctx.params
        ds = load_mnist(p.get("dataset_name") or "mnist", p.get("split") or "test", p.get("max_samples"),
                        p.get("data_dir") or None)
        ctx.ops.open_dataset(ds.name)
        return {"dataset": ds.name, "samples": len(ds)}
