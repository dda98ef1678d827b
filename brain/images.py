"""Training images from MNIST files or from any FiftyOne view with `ground_truth` labels."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from fiftyone_diffusion.errors import InputError


@dataclass
class LabeledImages:
    images: np.ndarray  # (N, size, size) uint8 grayscale
    labels: np.ndarray  # (N,) int64 indices into `classes`
    classes: list[str] = field(default_factory=lambda: [str(i) for i in range(10)])
    source: str = "mnist"


def from_mnist(split: str = "train", data_dir: str | None = None) -> LabeledImages:
    from fiftyone_diffusion.brain.mnist import read_mnist

    data = read_mnist(split, data_dir)
    return LabeledImages(data.images, data.labels, source=f"mnist-{split}")


def from_view(view, label_field: str = "ground_truth", size: int = 28) -> LabeledImages:
    """Grayscale, resized images and their class indices from a FiftyOne view."""
    if len(view) == 0:
        raise InputError("the view is empty: nothing to train on")
    paths, labels = view.values(["filepath", f"{label_field}.label"])
    keep = [i for i, label in enumerate(labels) if label is not None]
    if not keep:
        raise InputError(f"no sample in the view has a `{label_field}` classification")
    classes = sorted({labels[i] for i in keep}, key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0, c))
    index = {c: k for k, c in enumerate(classes)}
    images = np.empty((len(keep), size, size), dtype=np.uint8)
    for row, i in enumerate(keep):
        try:
            with Image.open(paths[i]) as im:
                images[row] = np.asarray(im.convert("L").resize((size, size), Image.BILINEAR))
        except OSError as e:
            raise InputError(f"cannot read {paths[i]}: {e}") from None
    return LabeledImages(images, np.array([index[labels[i]] for i in keep], dtype=np.int64), classes, "fiftyone-view")
