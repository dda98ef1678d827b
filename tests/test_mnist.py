"""Reading MNIST IDX files and loading them into FiftyOne."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fiftyone_diffusion.brain.mnist import read_idx, read_mnist
from fiftyone_diffusion.errors import InputError

CLI = os.path.join(os.path.dirname(sys.executable), "fiftyone-diffusion")


def test_reads_gzipped_and_plain_idx(mnist_dir, tmp_path):
    split = read_mnist("test", mnist_dir)
    assert split.images.shape == (10000, 28, 28) and split.images.dtype == np.uint8
    assert np.bincount(split.labels).tolist()[:2] == [980, 1135]
    plain = tmp_path / "t10k-labels-idx1-ubyte"
    plain.write_bytes(gzip.decompress(open(os.path.join(mnist_dir, "t10k-labels-idx1-ubyte.gz"), "rb").read()))
    assert (read_idx(str(plain)) == split.labels).all()


def _copy_mnist(src: str, dst) -> None:
    for name in os.listdir(src):
        shutil.copy(os.path.join(src, name), dst / name)


def test_missing_file_names_folder_and_files(tmp_path):
    with pytest.raises(InputError) as e:
        read_mnist("test", str(tmp_path))
    assert str(tmp_path) in str(e.value) and "t10k-images-idx3-ubyte.gz" in str(e.value)


def test_truncated_file_is_a_clear_error(mnist_dir, tmp_path):
    _copy_mnist(mnist_dir, tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(InputError, match="truncated"):
        read_mnist("test", str(tmp_path))
    path.write_bytes(open(os.path.join(mnist_dir, "t10k-images-idx3-ubyte.gz"), "rb").read()[:5000])
    with pytest.raises(InputError, match="truncated or corrupt"):
        read_mnist("test", str(tmp_path))


def test_load_mnist_creates_dataset_and_reuses_pngs(mnist_dir, dataset_name):
    from fiftyone_diffusion import load_mnist

    ds = load_mnist(dataset_name, "test", max_samples=50, data_dir=mnist_dir)
    assert len(ds) == 50 and ds.persistent
    labels = ds.values("ground_truth.label")
    assert labels[:5] == ["7", "2", "1", "0", "4"]
    first = ds.first().filepath
    mtime = os.path.getmtime(first)
    again = load_mnist(dataset_name, "test", max_samples=50, data_dir=mnist_dir)
    assert len(again) == 50 and os.path.getmtime(first) == mtime


def test_bad_mnist_leaves_no_dataset_and_cli_prints_one_line(mnist_dir, tmp_path, dataset_name):
    import fiftyone as fo

    _copy_mnist(mnist_dir, tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    proc = subprocess.run([CLI, "load-mnist", "--dataset-name",
                           dataset_name, "--data-dir", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: MNIST files missing in")
    assert "Traceback" not in proc.stderr
    assert not fo.dataset_exists(dataset_name)


def test_load_mnist_operator_creates_the_dataset(mnist_dir, dataset_name):
    import fiftyone as fo
    from fiftyone.operators import execute_operator

    execute_operator("@fiftyone-diffusion/diffusion/load_mnist",
                     params={"dataset_name": dataset_name, "split": "test", "max_samples": 20, "data_dir": mnist_dir})
    assert fo.dataset_exists(dataset_name)
    assert len(fo.load_dataset(dataset_name)) == 20
