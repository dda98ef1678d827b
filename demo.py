"""The main job: MNIST and generated digits in FiftyOne, summarised, then the App."""

from __future__ import annotations

import os
from collections import Counter

GENERATED = "ddpm_mnist_generated_samples"


def run_demo(no_app: bool = False, num_samples: int = 200, data_dir: str | None = None, port: int = 5151,
             address: str = "127.0.0.1") -> dict:
    import fiftyone as fo

    from fiftyone_diffusion.brain.generation import generate_ddpm_samples
    from fiftyone_diffusion.brain.mnist import load_mnist
    from fiftyone_diffusion.plugins.ddpm import SHIPPED_DDPM_DIR

    mnist = load_mnist("mnist", "test", data_dir=data_dir)
    summary = {"mnist": {"dataset": mnist.name, "samples": len(mnist),
                         "per_label": dict(sorted(Counter(mnist.values("ground_truth.label")).items()))}}
    dataset = mnist
    if os.path.isfile(os.path.join(SHIPPED_DDPM_DIR, "unet", "config.json")) and num_samples > 0:
        if fo.dataset_exists(GENERATED):
            fo.delete_dataset(GENERATED)
        result = generate_ddpm_samples(GENERATED, num_samples=num_samples, seed=0)
        dataset = fo.load_dataset(GENERATED)
        labels = dataset.values("prediction.label")
        confidences = [c for c in dataset.values("prediction.confidence") if c is not None]
        summary["generated"] = {
            "dataset": GENERATED, "samples": result["created"], "sampler": result["sampler"],
            "steps": result["steps"], "per_predicted_digit": dict(sorted(Counter(labels).items())),
            "mean_confidence": round(sum(confidences) / max(1, len(confidences)), 4),
        }
    _print_summary(summary)
    if not no_app:
        session = fo.launch_app(dataset, address=address, port=port, remote=True)
        print(f"FiftyOne App: http://{address}:{port}/  (Ctrl+C to stop)", flush=True)
        session.wait(-1)
    return summary


def _print_summary(summary: dict) -> None:
    m = summary["mnist"]
    print(f"{m['dataset']}: {m['samples']} samples; per label: {m['per_label']}")
    g = summary.get("generated")
    if g:
        print(f"{g['dataset']}: {g['samples']} samples ({g['sampler']}, {g['steps']} steps)")
        print("  count per predicted digit: " + "  ".join(f"{k}:{v}" for k, v in g["per_predicted_digit"].items()))
        print(f"  mean confidence: {g['mean_confidence']:.3f}")
    else:
        print("generated samples: skipped (no shipped DDPM in this install)")
