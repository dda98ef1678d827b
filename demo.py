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
        # unconditional digits (autoguided by the shipped guide); the SDE form of DPM-Solver++ gives this
        # model's cleanest ones at 20 steps
        result = generate_ddpm_samples(GENERATED, num_samples=num_samples, sampler="dpmsolver++-sde", seed=0)
        dataset = fo.load_dataset(GENERATED)
        labels = dataset.values("prediction.label")
        confidences = [c for c in dataset.values("prediction.confidence") if c is not None]
        summary["generated"] = {
            "dataset": GENERATED, "samples": result["created"], "sampler": result["sampler"],
            "steps": result["steps"], "autoguide_model": result["autoguide_model"],
            "autoguide_scale": result["autoguide_scale"], "per_predicted_digit": dict(sorted(Counter(labels).items())),
            "mean_confidence": round(sum(confidences) / max(1, len(confidences)), 4),
        }
        summary["clip"] = _clip_curation(dataset)
    _print_summary(summary)
    if not no_app:
        session = fo.launch_app(dataset, address=address, port=port, remote=True)
        print(f"FiftyOne App: http://{address}:{port}/  (Ctrl+C to stop)", flush=True)
        session.wait(-1)
    return summary


def _clip_curation(dataset) -> dict:
    """digit-CLIP embeddings, a text-searchable index and zero-shot labels in `clip_prediction`."""
    from fiftyone_diffusion.brain.clip import build_similarity_index, search, zero_shot_classify

    build_similarity_index(dataset, model="digit-clip", brain_key="clip_sim")
    zero_shot_classify(dataset, [str(i) for i in range(10)], model="digit-clip", label_field="clip_prediction")
    agree = sum(a == b for a, b in zip(dataset.values("prediction.label"), dataset.values("clip_prediction.label"),
                                       strict=True))
    top = search(dataset, "a handwritten seven", k=10, brain_key="clip_sim")
    return {"brain_key": "clip_sim", "zero_shot_agrees_with_classifier": round(agree / max(1, len(dataset)), 3),
            "top10_for_a_handwritten_seven": top.values("prediction.label")}


def _print_summary(summary: dict) -> None:
    m = summary["mnist"]
    print(f"{m['dataset']}: {m['samples']} samples; per label: {m['per_label']}")
    g = summary.get("generated")
    if g:
        guide = f", autoguided by {g['autoguide_model']} x{g['autoguide_scale']}" if g["autoguide_model"] else ""
        print(f"{g['dataset']}: {g['samples']} samples ({g['sampler']}, {g['steps']} steps{guide})")
        print("  count per predicted digit: " + "  ".join(f"{k}:{v}" for k, v in g["per_predicted_digit"].items()))
        print(f"  mean confidence: {g['mean_confidence']:.3f}")
    else:
        print("generated samples: skipped (no shipped DDPM in this install)")
    c = summary.get("clip")
    if c:
        print(f"  digit-CLIP: index '{c['brain_key']}' (try a text query in the App), zero-shot labels in "
              f"clip_prediction agree with the classifier on {c['zero_shot_agrees_with_classifier'] * 100:.1f}%")
        print(f"  search 'a handwritten seven' -> top 10 classifier labels {c['top10_for_a_handwritten_seven']}")
