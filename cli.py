"""The `fiftyone-diffusion` command line: the SDK's functions as subcommands."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _add_load_mnist(sub) -> None:
    p = sub.add_parser("load-mnist", help="load MNIST into a FiftyOne dataset with ground_truth labels")
    p.add_argument("--dataset-name", default="mnist")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--max-samples", type=int)
    p.add_argument("--data-dir", help="folder with the four MNIST IDX files (gzipped or not)")
    p.add_argument("--media-dir")
    p.add_argument("--overwrite", action="store_true")


def _add_train_classifier(sub) -> None:
    from fiftyone_diffusion.plugins.classifier import SHIPPED_CLASSIFIER

    p = sub.add_parser("train-classifier", help="train the digit classifier CNN on MNIST")
    p.add_argument("--output-dir", default=SHIPPED_CLASSIFIER)
    p.add_argument("--data-dir")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-train-samples", type=int)


def _add_train_ddpm(sub) -> None:
    p = sub.add_parser("train-ddpm", help="train a DDPM on MNIST or a dataset (resumes from checkpoints)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--data-dir", help="MNIST folder (default: the download cache)")
    p.add_argument("--dataset", help="train on this FiftyOne dataset's ground_truth labels instead of MNIST")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--beta-schedule", default="linear", choices=["linear", "cosine"])
    p.add_argument("--unconditional", action="store_true", help="no class conditioning")
    p.add_argument("--upsample-mode", default="bilinear", choices=["bilinear", "nearest", "transposed"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--no-resume", action="store_true")


def _add_generate_ddpm(sub) -> None:
    p = sub.add_parser("generate-ddpm-samples", help="sample a DDPM into a FiftyOne dataset")
    p.add_argument("--dataset", default="ddpm_mnist_generated_samples")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--model", help="shipped name (ddpm-mnist), DDPM folder or hub id")
    p.add_argument("--sampler", default="dpmsolver++", choices=["ddpm", "ddim", "dpmsolver++"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", type=int, help="class to generate (class-conditional models)")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--trajectory-steps", type=int, default=10)
    p.add_argument("--media-dir")
    p.add_argument("--no-classify", action="store_true", help="skip the digit classifier's prediction")


def _add_plugin(sub) -> None:
    p = sub.add_parser("plugin", help="manage the FiftyOne plugin")
    p.add_argument("action", choices=["install", "uninstall", "path"])
    p.add_argument("--plugins-dir", help="default: FiftyOne's plugins dir (FIFTYONE_PLUGINS_DIR)")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job: MNIST and generated digits in FiftyOne, then the App")
    p.add_argument("--no-app", action="store_true", help="run headless and print a summary")
    p.add_argument("--num-samples", type=int, default=200)
    p.add_argument("--data-dir")
    p.add_argument("--port", type=int, default=5151)
    p.add_argument("--address", default="127.0.0.1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fiftyone-diffusion",
        description="Diffusion models and CLIP for dataset curation in FiftyOne.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_load_mnist, _add_train_classifier, _add_train_ddpm, _add_generate_ddpm, _add_plugin, _add_demo):
        add(sub)
    return parser


def run(args: argparse.Namespace) -> object:
    cmd = args.command
    if cmd == "plugin":
        from fiftyone_diffusion.plugin_install import plugin_command

        return plugin_command(args.action, args.plugins_dir)
    if cmd == "demo":
        from fiftyone_diffusion.demo import run_demo

        run_demo(no_app=args.no_app, num_samples=args.num_samples, data_dir=args.data_dir,
                 port=args.port, address=args.address)
        return None
    if cmd == "load-mnist":
        from fiftyone_diffusion.brain.mnist import load_mnist

        ds = load_mnist(args.dataset_name, args.split, args.max_samples, args.data_dir, args.media_dir,
                        overwrite=args.overwrite)
        return {"dataset": ds.name, "samples": len(ds)}
    if cmd == "train-classifier":
        from fiftyone_diffusion.brain.training import train_classifier

        return train_classifier(args.output_dir, args.data_dir, args.epochs, args.batch_size, args.learning_rate,
                                args.seed, args.device, args.max_train_samples)
    if cmd == "train-ddpm":
        from fiftyone_diffusion.brain.training import train_ddpm

        view = None
        if args.dataset:
            import fiftyone as fo

            view = fo.load_dataset(args.dataset)
        return train_ddpm(args.output_dir, data_dir=args.data_dir, view=view, steps=args.steps,
                          batch_size=args.batch_size, learning_rate=args.learning_rate,
                          checkpoint_every=args.checkpoint_every, beta_schedule=args.beta_schedule,
                          conditional=not args.unconditional, upsample_mode=args.upsample_mode, seed=args.seed,
                          device=args.device, precision=args.precision, resume=not args.no_resume)
    if cmd == "generate-ddpm-samples":
        from fiftyone_diffusion.brain.generation import generate_ddpm_samples

        result = generate_ddpm_samples(
            args.dataset, num_samples=args.num_samples, model=args.model, sampler=args.sampler, steps=args.steps,
            seed=args.seed, label=args.label, guidance_scale=args.guidance_scale, batch_size=args.batch_size,
            device=args.device, trajectory_steps=args.trajectory_steps, media_dir=args.media_dir,
            classify_samples=False if args.no_classify else None,
        )
        return result
    raise AssertionError(cmd)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fiftyone_diffusion.errors import InputError

    try:
        result = run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if isinstance(result, dict):
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    sys.exit(main())
