"""SDXL speed: seconds per image at 1024x1024, 30 steps, batch 1 and 4, fp16 vs bf16, with and without torch.compile.

Runs through the same backend code as `generate_sdxl_samples` (`plugins.sdxl.generate`, SDPA attention,
euler scheduler, CFG 5.0, latent trajectory previews off). On a GPU it times `--model` when given, else
SDXL base's architecture at full size with random weights (timing does not depend on the weights). On
CPU it times the tiny test pipeline (`plugins.sdxl_tiny`), in fp32 and bf16, without compile unless asked.

    .venv/bin/python benchmarks/sdxl_speed.py                      # GPU: the full grid
    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/sdxl_speed.py --device cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import diffusers
import torch

from fiftyone_diffusion.plugins.devices import resolve_device
from fiftyone_diffusion.plugins.sdxl import PRECISIONS, SDXLModel, generate, load_sdxl
from fiftyone_diffusion.plugins.sdxl_tiny import build_sdxl_pipeline


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "CPU")
    return f"{model}, {torch.get_num_threads()} thread(s)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args, device: torch.device, precision: str) -> SDXLModel:
    """The pipeline to time, in `precision` on `device`."""
    if args.model:
        return load_sdxl(args.model, device, precision)
    dtype = PRECISIONS[precision]
    pipe = build_sdxl_pipeline(full_size=device.type == "cuda", device=device)  # not saved: timing only
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return SDXLModel(pipe=pipe, name="random-weights", dtype=dtype, device=device,
                     scheduler_config=dict(pipe.scheduler.config))


def time_run(model: SDXLModel, batch: int, args, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared CPU core the second one excludes waiting."""
    prompts = [f"a watercolor painting of a lighthouse, number {i}" for i in range(batch)]
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    generate(model, prompts, list(range(batch)), steps=args.steps, guidance_scale=5.0, width=args.size,
             height=args.size, scheduler="euler")
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", help="hub id or SDXL folder (default: random weights, full size on GPU)")
    parser.add_argument("--size", type=int, help="image side (default 1024; 256 on CPU)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--precisions", nargs="+", help="default fp16 bf16 on GPU, fp32 bf16 on CPU")
    parser.add_argument("--compile", choices=["off", "on", "both"], help="default both on GPU, off on CPU")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up run")
    args = parser.parse_args()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    args.size = args.size or (1024 if gpu else 256)
    precisions = args.precisions or (["fp16", "bf16"] if gpu else ["fp32", "bf16"])
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile or ("both" if gpu else "off")]
    print(json.dumps({"hardware": hardware(device), "torch": torch.__version__, "diffusers": diffusers.__version__,
                      "python": platform.python_version(), "size": args.size, "steps": args.steps,
                      "pipeline": args.model or ("SDXL base architecture, random weights" if gpu else "tiny")}))
    for precision in precisions:
        model = build(args, device, precision)
        eager_unet = model.pipe.unet
        for compiled in compiles:
            model.pipe.unet = torch.compile(eager_unet) if compiled else eager_unet
            for batch in args.batch_sizes:
                warmup = time_run(model, batch, args, device)[0]  # includes compilation when compiled
                runs = [time_run(model, batch, args, device) for _ in range(args.repeats)]
                print(json.dumps({"precision": precision, "compile": compiled, "batch": batch,
                                  "s_per_image": round(min(r[0] for r in runs) / batch, 4),
                                  "cpu_s_per_image": round(min(r[1] for r in runs) / batch, 4),
                                  "warmup_s": round(warmup, 2),
                                  "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if gpu
                                  else None}), flush=True)
        model.pipe.unet = eager_unet
        del model
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)


if __name__ == "__main__":
    main()
