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
    p.add_argument("--beta-schedule", default="cosine", choices=["linear", "cosine"])
    p.add_argument("--prediction-type", default="v_prediction", choices=["v_prediction", "epsilon"],
                   help="what the U-Net predicts (default: v, stable at high noise)")
    p.add_argument("--unconditional", action="store_true", help="no class conditioning")
    p.add_argument("--p-uncond", type=float, default=0.15,
                   help="share of batches trained on the null class (classifier-free guidance, label=None)")
    p.add_argument("--upsample-mode", default="bilinear", choices=["bilinear", "nearest", "transposed"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--init-from", help="warm-start from a DDPM folder written by train-ddpm (or ddpm-mnist)")


def _add_generate_ddpm(sub) -> None:
    from fiftyone_diffusion.plugins.ddpm_samplers import SAMPLERS  # not plugins.ddpm: diffusers takes seconds

    p = sub.add_parser("generate-ddpm-samples", help="sample a DDPM into a FiftyOne dataset")
    p.add_argument("--dataset", default="ddpm_mnist_generated_samples")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--model", help="shipped name (ddpm-mnist), DDPM folder or hub id")
    p.add_argument("--sampler", default="dpmsolver++", choices=SAMPLERS)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", help="class to generate (class-conditional models), or 'random': a random "
                                   "class per sample, guided to it; default: unconditional")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--autoguide-model", default="auto",
                   help="guide for unconditional samples (autoguidance): 'auto' (the model's recommended guide; "
                        "the shipped model's is ddpm-mnist-guide), 'none', or a DDPM folder")
    p.add_argument("--autoguide-scale", type=float, help="autoguidance weight (default: the model's recommended)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--trajectory-steps", type=int, default=10)
    p.add_argument("--media-dir")
    p.add_argument("--no-classify", action="store_true", help="skip the digit classifier's prediction")
    p.add_argument("--run-key", help="resume the interrupted run with this key (printed by every run)")


def _add_compute_forward_trajectory(sub) -> None:
    p = sub.add_parser("compute-forward-trajectory", help="store forward-diffusion (noising) strips for a dataset")
    p.add_argument("--dataset", required=True)
    p.add_argument("--noise-levels", default="0,0.2,0.4,0.6,0.8,1", help="comma-separated fractions of T")
    p.add_argument("--schedule", default="cosine", choices=["linear", "cosine"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", help="diffusers AutoencoderKL folder: noise the latents instead of the pixels")
    p.add_argument("--media-dir")
    p.add_argument("--max-size", type=int, default=256)
    p.add_argument("--device", default="auto")


def _add_generate_sdxl(sub) -> None:
    p = sub.add_parser("generate-sdxl-samples", help="generate SDXL text-to-image samples into a FiftyOne dataset")
    p.add_argument("prompts", nargs="*", help="prompts (or --prompts-file)")
    p.add_argument("--prompts-file", help="text file with one prompt per line")
    p.add_argument("--dataset", default="sdxl_generated_samples")
    p.add_argument("--negative-prompt")
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="image k of the run uses seed + k")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--scheduler", default="euler", help="euler, euler_ancestral, dpm++_2m, dpm++_2m_karras, ddim, ...")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--model", help="hub id or local SDXL pipeline folder (default: SDXL base 1.0)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    p.add_argument("--trajectory-steps", type=int, default=8)
    p.add_argument("--trajectory-preview", default="latent", choices=["latent", "vae"])
    p.add_argument("--cpu-offload", action="store_true")
    p.add_argument("--vae-slicing", action="store_true")
    p.add_argument("--vae-tiling", action="store_true")
    p.add_argument("--refiner", help="SDXL refiner (hub id or folder) for the last steps")
    p.add_argument("--refiner-start", type=float, default=0.8, help="share of the steps the base model runs")
    p.add_argument("--clip-model", help="CLIP model spec: adds clip_score (and a prediction with --classes)")
    p.add_argument("--classes", nargs="+", help="zero-shot classes for the CLIP prediction")
    p.add_argument("--media-dir")


def _add_clip_model_args(p, batch_size: bool = True) -> None:
    p.add_argument("--dataset", required=True, help="FiftyOne dataset name")
    p.add_argument("--model", default="digit-clip",
                   help="digit-clip, open_clip:<name>, an open_clip or transformers folder, or a hub id")
    p.add_argument("--pretrained", help="open_clip pretrained tag or checkpoint path")
    if batch_size:
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--num-workers", type=int, help="DataLoader workers (default: by usable cores)")


def _add_train_clip(sub) -> None:
    from fiftyone_diffusion.plugins.clip_digit import SHIPPED_DIGIT_CLIP

    p = sub.add_parser("train-clip", help="train a digit-CLIP (open_clip format) on MNIST or a dataset")
    p.add_argument("--output-dir", default=SHIPPED_DIGIT_CLIP)
    p.add_argument("--data-dir", help="MNIST folder")
    p.add_argument("--dataset", help="train on this FiftyOne dataset's ground_truth labels instead of MNIST")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--no-eval", action="store_true", help="skip the MNIST test zero-shot evaluation")


def _add_compute_clip_embeddings(sub) -> None:
    p = sub.add_parser("compute-clip-embeddings", help="store CLIP image embeddings (only where missing)")
    _add_clip_model_args(p)
    p.add_argument("--embeddings-field", default="clip_embeddings")
    p.add_argument("--recompute", action="store_true", help="also re-embed samples that have an embedding")


def _add_build_similarity_index(sub) -> None:
    p = sub.add_parser("build-similarity-index", help="CLIP similarity index with text search (fiftyone-brain)")
    _add_clip_model_args(p)
    p.add_argument("--brain-key", default="clip_sim")
    p.add_argument("--backend", default="sklearn", help="sklearn, lancedb, qdrant, milvus, ...")
    p.add_argument("--embeddings-field", default="clip_embeddings")


def _add_search(sub) -> None:
    p = sub.add_parser("search", help="text search over a CLIP similarity index; prints the top k")
    p.add_argument("--dataset", required=True)
    p.add_argument("text")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--brain-key")


def _add_zero_shot_classify(sub) -> None:
    p = sub.add_parser("zero-shot-classify", help="CLIP zero-shot labels into a Classification field")
    _add_clip_model_args(p)
    p.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9", help="comma-separated")
    p.add_argument("--templates", help="comma-separated, e.g. 'a photo of a {c}' (default: built-in ensemble)")
    p.add_argument("--temperature", type=float, help="default: the model's learned temperature")
    p.add_argument("--label-field", default="prediction")
    p.add_argument("--no-logits", action="store_true")


def _load_dataset(name: str):
    import fiftyone as fo

    from fiftyone_diffusion.errors import InputError

    if not fo.dataset_exists(name):
        raise InputError(f"dataset {name!r} does not exist")
    return fo.load_dataset(name)


def _run_clip(args: argparse.Namespace) -> object:
    from fiftyone_diffusion.brain import clip

    cmd = args.command
    if cmd == "train-clip":
        from fiftyone_diffusion.brain.clip_training import train_clip

        return train_clip(args.output_dir, data_dir=args.data_dir,
                          view=_load_dataset(args.dataset) if args.dataset else None, steps=args.steps,
                          batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed,
                          device=args.device, precision=args.precision, evaluate=not args.no_eval)
    ds = _load_dataset(args.dataset)
    if cmd == "search":
        view = clip.search(ds, args.text, k=args.k, brain_key=args.brain_key)
        return {"results": [{"id": s.id, "filepath": s.filepath,
                             "ground_truth": s.ground_truth.label if s.has_field("ground_truth") and s.ground_truth
                             else None} for s in view]}
    common = dict(model=args.model, pretrained=args.pretrained, batch_size=args.batch_size,
                  num_workers=args.num_workers)
    if cmd == "compute-clip-embeddings":
        return clip.compute_clip_embeddings(ds, embeddings_field=args.embeddings_field,
                                            skip_existing=not args.recompute, **common)
    if cmd == "build-similarity-index":
        return clip.build_similarity_index(ds, brain_key=args.brain_key, backend=args.backend,
                                           embeddings_field=args.embeddings_field, **common)
    split = lambda s: [c.strip() for c in (s or "").split(",") if c.strip()]  # noqa: E731
    return clip.zero_shot_classify(ds, split(args.classes), templates=split(args.templates) or None,
                                   temperature=args.temperature, label_field=args.label_field,
                                   store_logits=not args.no_logits, **common)


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


def _add_worker(sub) -> None:
    p = sub.add_parser("worker", help="run queued (delegated) operations; one worker per GPU")
    p.add_argument("--device", default="auto", help="what device=auto means for the operations (cpu, cuda, cuda:1)")
    p.add_argument("--max-operations", type=int, help="exit after running this many operations")
    p.add_argument("--idle-exit", type=float, metavar="SECONDS", help="exit once the queue stayed empty this long")
    p.add_argument("--poll-interval", type=float, default=2.0, metavar="SECONDS")
    p.add_argument("--monitor", action="store_true",
                   help="run each operation in a child process, killed when the operation is marked failed")
    p.add_argument("--monitor-interval", type=float, default=60.0, metavar="SECONDS")
    p.add_argument("--operator", help="only this operator (a URI, or a name of this plugin's operators)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fiftyone-diffusion",
        description="Diffusion models and CLIP for dataset curation in FiftyOne.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_load_mnist, _add_train_classifier, _add_train_ddpm, _add_generate_ddpm, _add_generate_sdxl,
                _add_compute_forward_trajectory, _add_train_clip, _add_compute_clip_embeddings,
                _add_build_similarity_index, _add_search, _add_zero_shot_classify, _add_plugin, _add_demo,
                _add_worker):
        add(sub)
    return parser


def run(args: argparse.Namespace) -> object:
    cmd = args.command
    if cmd == "plugin":
        from fiftyone_diffusion.plugin_install import plugin_command

        return plugin_command(args.action, args.plugins_dir)
    if cmd == "worker":
        import functools

        from fiftyone_diffusion.worker import run_worker

        return run_worker(device=args.device, max_operations=args.max_operations, idle_exit=args.idle_exit,
                          poll_interval=args.poll_interval, monitor=args.monitor,
                          monitor_interval=args.monitor_interval, operator=args.operator,
                          echo=functools.partial(print, flush=True))
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
                          prediction_type=args.prediction_type, p_uncond=args.p_uncond,
                          conditional=not args.unconditional, upsample_mode=args.upsample_mode, seed=args.seed,
                          device=args.device, precision=args.precision, resume=not args.no_resume,
                          warmup_steps=args.warmup_steps, init_from=args.init_from)
    if cmd == "generate-ddpm-samples":
        from fiftyone_diffusion.brain.generation import generate_ddpm_samples

        result = generate_ddpm_samples(
            args.dataset, num_samples=args.num_samples, model=args.model, sampler=args.sampler, steps=args.steps,
            seed=args.seed, label=args.label, guidance_scale=args.guidance_scale, batch_size=args.batch_size,
            device=args.device, trajectory_steps=args.trajectory_steps, media_dir=args.media_dir,
            classify_samples=False if args.no_classify else None, run_key=args.run_key,
            autoguide_model=args.autoguide_model, autoguide_scale=args.autoguide_scale,
        )
        return result
    if cmd == "generate-sdxl-samples":
        from fiftyone_diffusion.brain.sdxl import generate_sdxl_samples, read_prompts_file

        prompts = list(args.prompts) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
        return generate_sdxl_samples(
            args.dataset, prompts, negative_prompt=args.negative_prompt, images_per_prompt=args.images_per_prompt,
            seed=args.seed, steps=args.steps, guidance_scale=args.guidance_scale, width=args.width,
            height=args.height, scheduler=args.scheduler, batch_size=args.batch_size, model=args.model,
            device=args.device, precision=args.precision, trajectory_steps=args.trajectory_steps,
            trajectory_preview=args.trajectory_preview, cpu_offload=args.cpu_offload, vae_slicing=args.vae_slicing,
            vae_tiling=args.vae_tiling, media_dir=args.media_dir, clip=args.clip_model, classes=args.classes,
            refiner=args.refiner, refiner_start=args.refiner_start,
        )
    if cmd == "compute-forward-trajectory":
        from fiftyone_diffusion.brain.trajectory import compute_forward_trajectory, parse_levels

        levels = parse_levels(args.noise_levels)  # before FiftyOne loads: bad input fails fast
        import fiftyone as fo

        if not fo.dataset_exists(args.dataset):
            from fiftyone_diffusion.errors import InputError

            raise InputError(f"dataset {args.dataset!r} does not exist")
        return compute_forward_trajectory(fo.load_dataset(args.dataset), noise_levels=levels, schedule=args.schedule,
                                          seed=args.seed, vae=args.vae, media_dir=args.media_dir,
                                          max_size=args.max_size, device=args.device)
    if cmd in ("train-clip", "compute-clip-embeddings", "build-similarity-index", "search", "zero-shot-classify"):
        return _run_clip(args)
    raise AssertionError(cmd)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fiftyone_diffusion.errors import InputError

    try:
        result = run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("\n".join(["interrupted", *getattr(e, "__notes__", [])]), file=sys.stderr)
        return 130
    if isinstance(result, dict):
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    sys.exit(main())
