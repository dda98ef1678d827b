"""CLIP embedding benchmark: this project's path vs FiftyOne's `compute_embeddings` with the zoo model.

Same architecture and weights on both sides (open_clip ViT-B-32, random weights saved once to a
safetensors file, so it runs offline), same JPEGs (1024x768, made here). Each configuration runs
in its own subprocess so peak RSS is its own. Prints images/s, the ratio to FiftyOne's best
configuration, peak RSS, the mean / min per-sample cosine between the two paths' embeddings, the
precision and decode path used; then text-query latency p50/p95 on random 512-d indexes, sklearn
vs lancedb.

    .venv/bin/python benchmarks/clip_embeddings.py --num-images 1000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def make_images(folder: str, n: int) -> list[str]:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"{i:05d}.jpg")
        if not os.path.isfile(path):
            base = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)  # smooth, photo-like content
            Image.fromarray(base).resize((1024, 768), Image.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def make_weights(path: str) -> str:
    if not os.path.isfile(path):
        import open_clip
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def run_one(kind: str, paths: list[str], weights: str, batch_size: int | None, num_workers: int | None,
            out: str, precision: str = "auto") -> dict:
    import fiftyone as fo

    ds = fo.Dataset()
    ds.add_samples([fo.Sample(filepath=p) for p in paths], progress=False)
    try:
        start = time.perf_counter()
        if kind == "ours":
            from fiftyone_diffusion.brain.clip import compute_clip_embeddings
            from fiftyone_diffusion.plugins.clip import load_clip_model

            model = load_clip_model("open_clip:ViT-B-32", pretrained=weights, precision=precision)  # untimed, as below
            start = time.perf_counter()
            r = compute_clip_embeddings(ds, model=model, batch_size=batch_size, num_workers=num_workers,
                                        progress=False)
            extra = {"precision": r["precision"], "decode": r["decode"], "failed": r["failed"]}
        else:
            import fiftyone.zoo as foz

            model = foz.load_zoo_model("open-clip-torch", clip_model="ViT-B-32", pretrained=weights)
            start = time.perf_counter()
            ds.compute_embeddings(model, embeddings_field="clip_embeddings", batch_size=batch_size,
                                  num_workers=num_workers, progress=False)
            extra = {"precision": "float32", "decode": "full (FiftyOne loader)"}
        seconds = time.perf_counter() - start
        emb = np.stack(ds.values("clip_embeddings"))
        np.save(out, emb / np.linalg.norm(emb, axis=1, keepdims=True))
        return {"images_per_s": round(len(paths) / seconds, 2), "seconds": round(seconds, 1),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), **extra}
    finally:
        ds.delete()


def _subprocess(kind: str, args, batch_size, num_workers, out: str) -> dict:
    cmd = [sys.executable, __file__, "--one", kind, "--num-images", str(args.num_images), "--work-dir", args.work_dir,
           "--out", out, "--precision", args.precision]
    if batch_size:
        cmd += ["--batch-size", str(batch_size)]
    if num_workers is not None:
        cmd += ["--num-workers", str(num_workers)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def text_query_latency(sizes: list[int], queries: int = 50) -> dict:
    import fiftyone as fo
    import fiftyone.brain as fob

    rng = np.random.default_rng(0)
    results = {}
    for n in sizes:
        ds = fo.Dataset()
        ds.add_samples([fo.Sample(filepath=f"/nonexistent/{i}.jpg") for i in range(n)], progress=False)
        emb = rng.standard_normal((n, 512)).astype(np.float32)
        for backend in ("sklearn", "lancedb"):
            kw = {"uri": tempfile.mkdtemp(prefix="lancedb-")} if backend == "lancedb" else {}
            index = fob.compute_similarity(ds, embeddings=emb, backend=backend, brain_key=f"b_{backend}", **kw)
            times = []
            for _ in range(queries):
                q = rng.standard_normal(512).astype(np.float32)
                t = time.perf_counter()
                ds.sort_by_similarity(q, k=25, brain_key=f"b_{backend}").values("id")
                times.append((time.perf_counter() - t) * 1000)
            results[f"{backend}@{n}"] = {"p50_ms": round(float(np.percentile(times, 50)), 1),
                                         "p95_ms": round(float(np.percentile(times, 95)), 1)}
            index.cleanup()
            ds.delete_brain_run(f"b_{backend}")
        ds.delete()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "clip-embeddings-benchmark"))
    p.add_argument("--fo-batch-sizes", default="16,32,64", help="FiftyOne configurations tried for its best")
    p.add_argument("--fo-num-workers", default="0,4")
    p.add_argument("--query-sizes", default="10000,100000")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="this project's path")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--num-workers", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    paths = make_images(os.path.join(args.work_dir, "images"), args.num_images)
    weights = make_weights(os.path.join(args.work_dir, "vit-b-32-random.safetensors"))
    if args.one:
        print(json.dumps(run_one(args.one, paths, weights, args.batch_size, args.num_workers, args.out,
                                 args.precision)))
        return
    rows = {}
    out = lambda name: os.path.join(args.work_dir, f"{name}.npy")  # noqa: E731
    rows["ours"] = _subprocess("ours", args, 64, None, out("ours"))
    rows["fiftyone-defaults"] = _subprocess("fiftyone", args, None, None, out("fiftyone-defaults"))
    for bs in [int(b) for b in args.fo_batch_sizes.split(",") if b]:
        for nw in [int(w) for w in args.fo_num_workers.split(",") if w]:
            rows[f"fiftyone-bs{bs}-w{nw}"] = _subprocess("fiftyone", args, bs, nw, out(f"fiftyone-bs{bs}-w{nw}"))
    best = max((k for k in rows if k.startswith("fiftyone")), key=lambda k: rows[k]["images_per_s"])
    ours = np.load(out("ours"))
    for name, row in rows.items():
        cos = (np.load(out(name)) * ours).sum(1)
        row["cosine_to_ours_mean"], row["cosine_to_ours_min"] = round(float(cos.mean()), 5), round(float(cos.min()), 5)
        row["ratio_ours_over_this"] = round(rows["ours"]["images_per_s"] / row["images_per_s"], 2)
    report = {"images": args.num_images, "cores": len(os.sched_getaffinity(0)), "fiftyone_best": best,
              "speedup_vs_fiftyone_best": rows[best]["ratio_ours_over_this"], "runs": rows}
    sizes = [int(s) for s in args.query_sizes.split(",") if s]
    if sizes:
        report["text_query_latency"] = text_query_latency(sizes)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
