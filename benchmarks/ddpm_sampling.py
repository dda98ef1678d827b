"""DDPM sampler benchmark: speed and quality of DDPM, DDIM and DPM-Solver++ side by side.

For each sampler: images/s, speed ratio to DDPM-1000, fraction of samples the digit classifier
labels with confidence >= 0.9, per-digit share, and a Frechet distance between the classifier's
penultimate features of generated and MNIST-test images, next to a real-vs-real baseline (the two
halves of MNIST test). Also times diffusers' own DDPMPipeline driving the same U-Net.

    .venv/bin/python benchmarks/ddpm_sampling.py --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy import linalg

from fiftyone_diffusion.brain.generation import batch_labels, resolve_autoguide
from fiftyone_diffusion.brain.images import from_mnist
from fiftyone_diffusion.plugins.classifier import DigitClassifier, classify
from fiftyone_diffusion.plugins.ddpm import load_ddpm, sample
from fiftyone_diffusion.plugins.devices import fast_dtype, resolve_device


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def quality(classifier, images, real_feats) -> dict:
    logits, feats = classify(classifier, images)
    probs = torch.softmax(logits, 1)
    conf, pred = probs.max(1)
    share = np.bincount(pred.numpy(), minlength=10) / len(pred)
    return {
        "conf_ge_0.9": round(float((conf >= 0.9).float().mean()), 4),
        "mean_conf": round(float(conf.mean()), 4),
        "digit_share": [round(float(v), 3) for v in share],
        "fd": round(frechet(feats.numpy(), real_feats), 2),
        "predictions": pred.tolist(),
    }


def pipeline_rate(model, n: int, steps: int, device) -> float:
    """images/s of diffusers.DDPMPipeline driving the same U-Net (unconditional branch)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    unet = model.unet
    if model.conditional:
        null = model.null_class
        forward = unet.forward

        def unconditional(x, t, *args, **kwargs):
            kwargs.setdefault("class_labels", torch.full((x.shape[0],), null, device=x.device))
            return forward(x, t, *args, **kwargs)

        unet.forward = unconditional
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(model.scheduler_config)).to(device)
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    pipe(batch_size=n, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np")
    rate = n / (time.perf_counter() - start)
    if model.conditional:
        del unet.forward
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the shipped ddpm-mnist")
    ap.add_argument("--data-dir")
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--ddpm-samples", type=int, default=None, help="fewer samples for DDPM-1000 (slow)")
    ap.add_argument("--pipeline-samples", type=int, default=32, help="samples for the DDPMPipeline timing")
    ap.add_argument("--samplers", default="ddpm:1000,ddim:50,dpmsolver++:20,dpmsolver++:10")
    ap.add_argument("--label", default=None, help="class-conditional runs: this digit, or 'random' (one per seed)")
    ap.add_argument("--guidance-scale", type=float, default=3.0)
    ap.add_argument("--autoguide-model", default="auto", help="unconditional runs: 'auto', 'none' or a DDPM folder")
    ap.add_argument("--autoguide-scale", type=float, default=None)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + num-samples - 1")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()

    device = resolve_device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.precision) or fast_dtype(device)
    model = load_ddpm(args.model, device)
    guide, guide_scale = resolve_autoguide(model, args.autoguide_model, args.autoguide_scale, args.label is None,
                                           device)
    classifier = DigitClassifier.load()
    test = from_mnist("test", args.data_dir)
    _, real_feats = classify(classifier, test.images)
    real_feats = real_feats.numpy()
    half = len(real_feats) // 2
    baseline = frechet(real_feats[:half], real_feats[half:])
    print(f"device={device.type} precision={str(dtype).replace('torch.', '')} threads={torch.get_num_threads()} "
          f"label={args.label} guidance={args.guidance_scale if args.label is not None else None} "
          f"autoguide={guide.name if guide else None} autoguide_scale={guide_scale}")
    print(f"real-vs-real Frechet distance (MNIST test halves): {baseline:.2f}")

    rows = []
    for spec in args.samplers.split(","):
        name, steps = spec.split(":")
        steps = int(steps)
        n = args.num_samples if not (name == "ddpm" and args.ddpm_samples) else args.ddpm_samples
        images, start = [], time.perf_counter()
        for i in range(0, n, args.batch_size):
            seeds = list(range(args.first_seed + i, args.first_seed + min(n, i + args.batch_size)))
            labels = batch_labels(model, seeds, args.label)
            images.append(sample(model, seeds, name, steps, labels, args.guidance_scale, device, dtype,
                                 guide=guide, guide_scale=guide_scale or 1.0))
        seconds = time.perf_counter() - start
        row = {"sampler": name, "steps": steps, "samples": n, "images_per_s": round(n / seconds, 2),
               **quality(classifier, torch.cat(images), real_feats)}
        rows.append(row)
        print(f"{name}-{steps}: {row['images_per_s']} img/s, conf>=0.9 {row['conf_ge_0.9']:.3f}, "
              f"FD {row['fd']}, shares {row['digit_share']}", flush=True)
    ref = next((r for r in rows if r["sampler"] == "ddpm"), rows[0])
    pipe = pipeline_rate(model, args.pipeline_samples, ref["steps"], device) if args.pipeline_samples else None

    print("\n| sampler | steps | samples | images/s | speed vs DDPM-1000 | conf >= 0.9 | Frechet dist. | "
          "min / max digit share |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sampler']} | {r['steps']} | {r['samples']} | {r['images_per_s']} | "
              f"{r['images_per_s'] / ref['images_per_s']:.1f}x | {r['conf_ge_0.9'] * 100:.1f}% | {r['fd']} | "
              f"{min(r['digit_share']) * 100:.1f}% / {max(r['digit_share']) * 100:.1f}% |")
    print(f"| real vs real (MNIST test halves) | | 5000 | | | | {baseline:.2f} | |")
    if pipe:
        print(f"\ndiffusers DDPMPipeline, same U-Net, {ref['steps']} steps, fp32 weights: {pipe:.3f} img/s; "
              f"this project's DDPM-{ref['steps']} is {ref['images_per_s'] / pipe:.2f}x that")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"baseline_fd": baseline, "pipeline_images_per_s": pipe,
                       "rows": [{k: v for k, v in r.items() if k != "predictions"} for r in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
