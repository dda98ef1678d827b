"""Test harness: a private MongoDB and private FiftyOne folders, set up before fiftyone is imported.

Tests never touch the user's database: FiftyOne's default one is shared by every process on a
machine (and the App restores its layout from it).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST_DIR = os.path.abspath(os.path.join(ROOT, "..", "shared", "data", "mnist"))
_STATE: dict = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> bool:
    """Whether a server process started by a test accepts connections on 127.0.0.1:port in time."""
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                return False
            time.sleep(0.2)


@pytest.fixture(scope="session")
def server_ports():
    """`(free_port, wait_for_port)` for tests that start a local server."""
    return _free_port, wait_for_port


def _mongod_path() -> str:
    return str(importlib.metadata.distribution("fiftyone-db").locate_file("fiftyone/db/bin/mongod"))


def pytest_configure(config):
    if "fiftyone" in sys.modules:
        raise RuntimeError("fiftyone was imported before the test database was set up")
    tmp = tempfile.mkdtemp(prefix="fo-diffusion-tests-")
    port = _free_port()
    dbpath = os.path.join(tmp, "db")
    os.makedirs(dbpath)
    proc = subprocess.Popen(
        [_mongod_path(), "--dbpath", dbpath, "--port", str(port), "--bind_ip", "127.0.0.1", "--nounixsocket"],
        stdout=open(os.path.join(tmp, "mongod.log"), "w"),
        stderr=subprocess.STDOUT,
    )
    if not wait_for_port(port, proc):
        raise RuntimeError(f"private mongod did not start; see {tmp}/mongod.log")
    plugins_dir = os.path.join(tmp, "plugins")
    os.makedirs(plugins_dir)
    os.symlink(ROOT, os.path.join(plugins_dir, "fiftyone-diffusion"))
    os.environ.update(
        FIFTYONE_DATABASE_URI=f"mongodb://127.0.0.1:{port}",
        FIFTYONE_DATABASE_DIR=os.path.join(tmp, "database-dir"),
        FIFTYONE_DEFAULT_DATASET_DIR=os.path.join(tmp, "datasets"),
        FIFTYONE_PLUGINS_DIR=plugins_dir,
        FIFTYONE_DO_NOT_TRACK="true",
        FIFTYONE_DIFFUSION_MNIST_DIR=MNIST_DIR,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    _STATE.update(tmp=tmp, port=port, proc=proc)


def pytest_unconfigure(config):
    proc = _STATE.get("proc")
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(_STATE["tmp"], ignore_errors=True)


@pytest.fixture(scope="session")
def private_db() -> dict:
    """The private database the whole session runs against: its URI and folders."""
    return {"uri": os.environ["FIFTYONE_DATABASE_URI"], "port": _STATE["port"], "tmp": _STATE["tmp"]}


@pytest.fixture(scope="session")
def mnist_dir() -> str:
    if not os.path.isdir(MNIST_DIR):
        pytest.fail(f"MNIST test data missing at {MNIST_DIR}")
    return MNIST_DIR


@pytest.fixture
def dataset_name(request) -> str:
    """A unique dataset name per test, deleted afterwards."""
    import fiftyone as fo

    name = f"test-{request.node.name}-{os.urandom(3).hex()}"[:100]
    yield name
    if fo.dataset_exists(name):
        fo.delete_dataset(name)


@pytest.fixture(scope="session")
def tiny_ddpm(tmp_path_factory, mnist_dir) -> str:
    """A tiny class-conditional DDPM folder (2 training steps), trained once per session."""
    from fiftyone_diffusion import train_ddpm

    out = str(tmp_path_factory.mktemp("tiny-ddpm"))
    train_ddpm(out, data_dir=mnist_dir, steps=2, block_out_channels=(32, 32, 32), batch_size=4,
               checkpoint_every=2, progress=False)
    return out


MICRO_CLIP_CFG = {"embed_dim": 8, "vision_cfg": {"image_size": 16, "patch_size": 8, "layers": 1, "width": 16,
                                                 "head_width": 8},
                  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}


@pytest.fixture(scope="session")
def random_open_clip(tmp_path_factory):
    """Builds a random open_clip folder (seed 0) from an open_clip config: `random_open_clip(name, cfg)`."""
    import open_clip
    import torch

    from fiftyone_diffusion.brain.clip_training import save_clip

    def build(name: str, cfg: dict) -> str:
        folder = str(tmp_path_factory.mktemp(name))
        torch.manual_seed(0)
        save_clip(open_clip.CLIP(**cfg), cfg, folder,
                  {"source": "random", "train_samples": 0, "steps": 0, "batch_size": 0, "precision": "float32",
                   "train_minutes": 0, "train_cpu_minutes": 0, "temperature": 0.07})
        return folder

    return build


@pytest.fixture(scope="session")
def micro_open_clip(random_open_clip) -> str:
    """A random open_clip folder with 8-d embeddings and 16x16 inputs (milliseconds per batch)."""
    return random_open_clip("micro-open-clip", MICRO_CLIP_CFG)
