"""Scale-out vector search through the same `build_similarity_index` / `search` API: fiftyone-brain's `milvus`
backend against a Milvus server on localhost (Milvus Lite's gRPC server, from the `milvus-lite` package:
the same protocol and configuration as a Milvus deployment), used by two processes.

Qdrant has no such test: fiftyone-brain's qdrant backend builds `QdrantClient(url=...)`, which never
reaches qdrant-client's local mode (`location=":memory:"` or `path=`), so it needs a Qdrant server
(see docs/scaling.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

_FRESH = """
import json, sys
import fiftyone as fo, fiftyone_diffusion
from fiftyone_diffusion import search
print(json.dumps(search(fo.load_dataset(sys.argv[1]), sys.argv[3], k=5, brain_key=sys.argv[2]).values("id")))
"""


@pytest.fixture
def milvus_uri(tmp_path, server_ports):
    """A Milvus Lite server on a free local port, stopped afterwards."""
    free_port, wait_for_port = server_ports
    port = free_port()
    cli = os.path.join(os.path.dirname(sys.executable), "milvus-lite")
    log = open(tmp_path / "milvus.log", "w")
    proc = subprocess.Popen([cli, "server", "--data-dir", str(tmp_path / "milvus"), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    if not wait_for_port(port, proc):
        proc.kill()
        pytest.fail(f"Milvus Lite server did not start: {(tmp_path / 'milvus.log').read_text()[-2000:]}")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture
def images(dataset_name, tmp_path):
    """40 samples of random 16x16 images."""
    import fiftyone as fo

    rng = np.random.default_rng(0)
    paths = []
    for i in range(40):
        paths.append(str(tmp_path / f"{i:02d}.png"))
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(paths[-1])
    ds = fo.Dataset(dataset_name)
    ds.add_samples([fo.Sample(filepath=p) for p in paths], progress=False)
    return ds


@pytest.mark.slow
def test_milvus_index_matches_the_in_process_one_from_two_processes_and_overwrite_drops_the_old_collection(
        images, micro_open_clip, milvus_uri, tmp_path):
    import pymilvus

    from fiftyone_diffusion import build_similarity_index, search

    uri = milvus_uri
    common = dict(model=micro_open_clip, num_workers=0, device="cpu", progress=False)
    build_similarity_index(images, brain_key="local", **common)  # sklearn, exact
    result = build_similarity_index(images, brain_key="mv", backend="milvus", uri=uri, collection_name="fod_a",
                                    metric="cosine", **common)
    assert result["backend"] == "milvus" and result["indexed"] == 40
    config = images.get_brain_info("mv").config
    assert (config.collection_name, config.metric, config.supports_prompts) == ("fod_a", "cosine", True)
    assert "uri" not in json.dumps(config.serialize())  # connection settings stay out of the database
    query = "a photo of a red square"
    exact = search(images, query, k=5, brain_key="local").values("id")
    assert search(images, query, k=5, brain_key="mv").values("id") == exact
    assert pymilvus.MilvusClient(uri).get_collection_stats("fod_a")["row_count"] == 40

    # another process (the App, a worker) finds the server through FiftyOne's brain config
    env = os.environ | {"FIFTYONE_BRAIN_SIMILARITY_MILVUS_URI": uri}
    out = subprocess.run([sys.executable, "-c", _FRESH, images.name, "mv", query], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == exact

    # rebuilding under the same key removes the old collection (delete_brain_run alone would leave it)
    build_similarity_index(images, brain_key="mv", backend="milvus", uri=uri, collection_name="fod_b",
                           metric="cosine", **common)
    assert pymilvus.MilvusClient(uri).list_collections() == ["fod_b"]
    assert search(images, query, k=5, brain_key="mv").values("id") == exact
