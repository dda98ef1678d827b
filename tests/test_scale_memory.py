"""Memory is flat in N: peak RSS for 2,000 samples stays within 30% of that for 200.

Each run is a fresh process, so its peak RSS (VmHWM) is that of the code path alone: DDPM
generation (tiny model, 1 sampler step, 1 trajectory frame) and CLIP embeddings + zero-shot labels
(tiny open_clip model, tiny images, more samples than one id-chunk). Every sample must go through the
path: the counts are checked in the child's result and in the database.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

SMALL, LARGE, MAX_RATIO = 200, 2000, 1.3
MAX_EXTRA_MB = 128  # and at most this much more in absolute terms (~70 KiB per extra sample)
# Peak RSS is VmHWM, not ru_maxrss (Linux carries ru_maxrss over fork + exec: a child would report pytest's
# peak). It is read twice: for the whole process, and for the call alone (reset after the imports, whose
# transient peak would otherwise hide any growth in the work itself).
_PEAK = """
import json, sys, time
import fiftyone, torch, fiftyone_diffusion.brain.clip, fiftyone_diffusion.brain.generation

def status(key):
    return int(next(x for x in open("/proc/self/status") if x.startswith(key + ":")).split()[1]) / 1024

process_peak, start_rss = status("VmHWM"), status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
start = time.perf_counter()
result = run(*sys.argv[1:])
peak = status("VmHWM")
print(json.dumps({"peak_rss_mb": peak, "process_peak_rss_mb": max(process_peak, peak), "start_rss_mb": start_rss,
                  "seconds": round(time.perf_counter() - start, 1), **result}))
"""
_GENERATE = """
def run(dataset, n, model, media_dir):
    from fiftyone_diffusion import generate_ddpm_samples
    r = generate_ddpm_samples(dataset, num_samples=int(n), model=model, sampler="ddim", steps=1, batch_size=64,
                              device="cpu", precision="fp32", trajectory_steps=1, media_dir=media_dir,
                              progress=False)
    return {"created": r["created"]}
"""
_CLIP = """
def run(dataset, n, model):
    import fiftyone as fo
    from fiftyone_diffusion import compute_clip_embeddings, zero_shot_classify
    ds = fo.load_dataset(dataset)
    emb = compute_clip_embeddings(ds, model=model, batch_size=64, num_workers=0, device="cpu", progress=False)
    zs = zero_shot_classify(ds, [str(d) for d in range(10)], model=model, batch_size=64, num_workers=0,
                            device="cpu", progress=False)
    return {"embedded": emb["embedded"], "classified": zs["classified"], "failed": emb["failed"] + zs["failed"]}
"""


def _peak(tmp_path, body: str, *args) -> dict:
    """Run `body`'s run(*args) in a fresh interpreter; its result plus the child's peak RSS in MiB."""
    out = subprocess.run([sys.executable, "-c", body + _PEAK, *map(str, args)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _report(name: str, small: dict, large: dict) -> None:
    ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
    print(f"\n{name}: peak RSS of the call {small['peak_rss_mb']:.0f} MiB for {SMALL} samples "
          f"({small['seconds']} s), {large['peak_rss_mb']:.0f} MiB for {LARGE} ({large['seconds']} s): x{ratio:.3f}; "
          f"whole process {small['process_peak_rss_mb']:.0f} / {large['process_peak_rss_mb']:.0f} MiB; "
          f"RSS when the call began {small['start_rss_mb']:.0f} / {large['start_rss_mb']:.0f} MiB")
    assert ratio < MAX_RATIO, (small, large)
    assert large["peak_rss_mb"] - small["peak_rss_mb"] < MAX_EXTRA_MB, (small, large)
    assert large["process_peak_rss_mb"] < MAX_RATIO * small["process_peak_rss_mb"], (small, large)


def _tiny_image_dataset(name: str, n: int, folder) -> None:
    import fiftyone as fo

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(n)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"{i:05d}.png")
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    ds = fo.Dataset(name)
    ds.add_samples([fo.Sample(filepath=p) for p in paths], progress=False)


@pytest.mark.slow
def test_generation_memory_is_flat_in_num_samples(tiny_ddpm, dataset_name, tmp_path):
    import fiftyone as fo

    runs = {}
    for n in (SMALL, LARGE):
        name = f"{dataset_name}-{n}"
        try:
            runs[n] = _peak(tmp_path, _GENERATE, name, n, tiny_ddpm, tmp_path / f"media-{n}")
            ds = fo.load_dataset(name)
            ds.reload()  # the child added fields: refresh this process's schema
            assert runs[n]["created"] == n and len(ds) == n and len(ds.exists("trajectory")) == n
            assert len(os.listdir(tmp_path / f"media-{n}")) == n + 1  # n images + trajectories/
        finally:
            if fo.dataset_exists(name):
                fo.delete_dataset(name)
    _report("generate_ddpm_samples", runs[SMALL], runs[LARGE])


@pytest.mark.slow
def test_clip_embeddings_and_zero_shot_memory_is_flat_in_num_samples(micro_open_clip, dataset_name, tmp_path):
    import fiftyone as fo

    from fiftyone_diffusion.brain.streaming import CHUNK_SIZE

    assert LARGE > CHUNK_SIZE  # the large run walks the view in more than one id-chunk
    runs = {}
    for n in (SMALL, LARGE):
        name = f"{dataset_name}-{n}"
        try:
            _tiny_image_dataset(name, n, tmp_path / f"images-{n}")
            runs[n] = _peak(tmp_path, _CLIP, name, n, micro_open_clip)
            ds = fo.load_dataset(name)
            ds.reload()  # the child added fields: refresh this process's schema
            assert runs[n]["embedded"] == n and runs[n]["classified"] == n and runs[n]["failed"] == 0
            assert len(ds.exists("clip_embeddings")) == n and len(ds.exists("prediction")) == n
            assert ds.limit(1).values("clip_embeddings")[0].shape == (8,)  # micro_open_clip's embed_dim
        finally:
            if fo.dataset_exists(name):
                fo.delete_dataset(name)
    _report("compute_clip_embeddings + zero_shot_classify", runs[SMALL], runs[LARGE])


def test_id_chunks_walk_a_view_that_shrinks_as_it_is_written(dataset_name):
    import fiftyone as fo
    from fiftyone import ViewField as F

    from fiftyone_diffusion.brain.streaming import iter_id_chunks
    from fiftyone_diffusion.errors import InputError

    ds = fo.Dataset(dataset_name)
    ds.add_samples([fo.Sample(filepath=f"/x/{i}.png", n=i) for i in range(23)], progress=False)
    seen = []
    todo = ds.sort_by("n", reverse=True).exists("done", False)  # shrinks as `done` lands; its own order ignored
    for ids, paths in iter_id_chunks(todo, ["filepath"], chunk_size=4):
        assert len(ids) == len(paths) <= 4
        seen += ids
        ds.set_values("done", dict.fromkeys(ids, True), key_field="id")
    assert len(seen) == len(set(seen)) == 23 and seen == sorted(seen) and len(ds.exists("done")) == 23
    odd = [ids for ids, in iter_id_chunks(ds.match(F("n") % 2 == 1), [], chunk_size=5)]
    assert [len(c) for c in odd] == [5, 5, 1]
    assert list(iter_id_chunks(ds.match(F("n") > 99), ["filepath"])) == []
    with pytest.raises(InputError):
        next(iter_id_chunks(ds, [], chunk_size=0))
