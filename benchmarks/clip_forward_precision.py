"""The bare ViT-B-32 image forward in fp32 vs bf16 weights on this machine: the ceiling of any precision gain.

Random open_clip weights (offline), random 224x224 inputs, no decoding: images/s per precision and thread
count, the bf16/fp32 ratio and the cosine between the two precisions' embeddings.

    .venv/bin/python benchmarks/clip_forward_precision.py --threads 1,2
"""

from __future__ import annotations

import argparse
import time

import open_clip
import torch


def rate(model, x: torch.Tensor, seconds: float) -> float:
    model.encode_image(x[:8])  # warm-up
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        model.encode_image(x)
        n += len(x)
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=8.0, help="timed per configuration")
    args = ap.parse_args()
    from fiftyone_diffusion.plugins.devices import cpu_has_fast_bf16

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    x = torch.randn(args.batch_size, 3, 224, 224)
    print(f"torch {torch.__version__}, fast bf16 on this CPU: {cpu_has_fast_bf16()}")
    print("| threads | fp32 images/s | bf16 weights images/s | bf16 / fp32 | cosine bf16 vs fp32 (mean) |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            model.float()
            fp32, ref = rate(model, x, args.seconds), model.encode_image(x[:16])
            model.to(torch.bfloat16)
            bf16 = rate(model, x.bfloat16(), args.seconds)
            cos = torch.nn.functional.cosine_similarity(model.encode_image(x[:16].bfloat16()).float(), ref).mean()
            print(f"| {threads} | {fp32:.1f} | {bf16:.1f} | {bf16 / fp32:.2f}x | {cos:.5f} |", flush=True)


if __name__ == "__main__":
    main()
