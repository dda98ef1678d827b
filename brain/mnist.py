"""MNIST: read the four standard IDX files and load them into FiftyOne."""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass

import numpy as np

from fiftyone_diffusion.errors import InputError

SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DEFAULT_DATA_DIR = os.path.join(
    os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "fiftyone-diffusion", "mnist"
)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class MnistSplit:
    images: np.ndarray  # (N, 28, 28) uint8
    labels: np.ndarray  # (N,) int64


def _find(data_dir: str, stem: str) -> str | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path
    return None


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (gzipped or not) into an array, checking its header and length."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        reason = f"{e.__class__.__name__}: {e}"
        raise InputError(f"{path}: cannot read ({reason}); the file is truncated or corrupt") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise InputError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InputError(f"{path}: truncated header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise InputError(
            f"{path}: truncated or corrupt: {len(raw) - header} data bytes, expected {expected} for shape {shape}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def resolve_data_dir(data_dir: str | None) -> str:
    """The folder holding MNIST; the default cache folder is filled by torchvision when online."""
    if data_dir:
        return os.path.abspath(os.path.expanduser(data_dir))
    env = os.environ.get("FIFTYONE_DIFFUSION_MNIST_DIR")
    if env:
        return env
    if all(_find(DEFAULT_DATA_DIR, s) for pair in SPLITS.values() for s in pair):
        return DEFAULT_DATA_DIR
    raw = os.path.join(DEFAULT_DATA_DIR, "MNIST", "raw")
    try:  # the usual download, for users who are online
        from torchvision.datasets import MNIST

        for train in (True, False):
            MNIST(DEFAULT_DATA_DIR, train=train, download=True)
    except Exception:  # offline: the error below names the folder and the files
        pass
    return raw


def read_mnist(split: str = "test", data_dir: str | None = None) -> MnistSplit:
    """Read one MNIST split; raises InputError naming the folder and any missing files."""
    if split not in SPLITS:
        raise InputError(f"unknown MNIST split {split!r}; choose one of {sorted(SPLITS)}")
    folder = resolve_data_dir(data_dir)
    paths = {stem: _find(folder, stem) for stem in SPLITS[split]}
    missing = [stem + ".gz" for stem, p in paths.items() if p is None]
    if missing:
        raise InputError(
            f"MNIST files missing in {folder}: {', '.join(missing)} (pass --data-dir / data_dir= "
            "to a folder with the four IDX files, gzipped or not)"
        )
    images = read_idx(paths[SPLITS[split][0]])
    labels = read_idx(paths[SPLITS[split][1]])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise InputError(f"{folder}: images {images.shape} and labels {labels.shape} do not match")
    return MnistSplit(images=np.asarray(images, dtype=np.uint8), labels=labels.astype(np.int64))


def load_mnist(
    dataset_name: str = "mnist",
    split: str = "test",
    max_samples: int | None = None,
    data_dir: str | None = None,
    media_dir: str | None = None,
    overwrite: bool = False,
):
    """Create (or reuse) a FiftyOne dataset of MNIST PNGs with `ground_truth` classifications.

    The PNGs are written once under `media_dir` and reused on re-runs. The dataset appears
    only once complete: on any error nothing half-created is left behind.
    """
    import fiftyone as fo
    from PIL import Image

    from fiftyone_diffusion.brain.media import atomic_save_image

    if max_samples is not None and max_samples <= 0:
        raise InputError(f"max_samples must be positive, got {max_samples}")
    data = read_mnist(split, data_dir)  # validates everything before anything is written
    count = len(data.labels) if max_samples is None else min(max_samples, len(data.labels))

    if fo.dataset_exists(dataset_name):
        existing = fo.load_dataset(dataset_name)
        info = existing.info.get("mnist", {})
        if not overwrite and info.get("split") == split and info.get("count") == count:
            return existing
        if not overwrite:
            raise InputError(
                f"dataset {dataset_name!r} exists with other content; pass overwrite=True (--overwrite)"
            )
        existing.delete()

    media_dir = media_dir or os.path.join(fo.config.default_dataset_dir, "fiftyone-diffusion", "mnist")
    folder = os.path.join(media_dir, split)
    os.makedirs(folder, exist_ok=True)
    dataset = fo.Dataset(dataset_name)
    try:
        samples = []
        for i in range(count):
            path = os.path.join(folder, f"{i:05d}.png")
            if not os.path.isfile(path):
                atomic_save_image(Image.fromarray(data.images[i], mode="L"), path)
            label = str(int(data.labels[i]))
            samples.append(
                fo.Sample(filepath=path, ground_truth=fo.Classification(label=label), mnist_index=i, tags=[split])
            )
        dataset.add_samples(samples, progress=count > 1000)
        dataset.info["mnist"] = {"split": split, "count": count}
        dataset.persistent = True
        dataset.save()
    except BaseException:
        dataset.delete()
        raise
    return dataset
