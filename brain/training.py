"""Training: the digit classifier and the DDPM (resumable, EMA, checkpoints, diffusers output)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from fiftyone_diffusion.brain.images import LabeledImages, from_mnist, from_view
from fiftyone_diffusion.errors import InputError
from fiftyone_diffusion.plugins.classifier import SHIPPED_CLASSIFIER, DigitClassifier, classify, to_classifier_input
from fiftyone_diffusion.plugins.devices import autocast, fast_dtype, resolve_device
from fiftyone_diffusion.plugins.noise import q_sample, velocity
from fiftyone_diffusion.plugins.unet import UPSAMPLE_MODES, DigitUNet

# v-prediction is the default: an epsilon model must match the noise's mean almost exactly at high noise,
# where x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) amplifies any error (grey backgrounds); v does not.
PREDICTION_TYPES = ("v_prediction", "epsilon")

ProgressFn = Callable[[int, int, float], None]


def _command() -> str:
    return " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))


def _atomic_torch_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _training_data(view, data_dir: str | None, size: int) -> LabeledImages:
    if view is not None:
        return from_view(view, size=size)
    return from_mnist("train", data_dir)


def train_classifier(
    output_dir: str = SHIPPED_CLASSIFIER,
    data_dir: str | None = None,
    epochs: int = 4,
    batch_size: int = 128,
    learning_rate: float = 3e-3,
    seed: int = 0,
    device: str = "auto",
    max_train_samples: int | None = None,
    progress: bool = True,
    on_progress: ProgressFn | None = None,
) -> dict:
    """Train the digit CNN on MNIST train, evaluate on MNIST test, save safetensors + card."""
    if epochs <= 0 or batch_size <= 0:
        raise InputError("epochs and batch_size must be positive")
    dev = resolve_device(device)
    train = from_mnist("train", data_dir)
    test = from_mnist("test", data_dir)
    images, labels = train.images, train.labels
    if max_train_samples:
        images, labels = images[:max_train_samples], labels[:max_train_samples]
    torch.manual_seed(seed)
    model = DigitClassifier().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=learning_rate, total_steps=total)
    x_all = to_classifier_input(images)
    y_all = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    start = time.time()
    bar = tqdm(total=total, desc="train-classifier", disable=not progress)
    step = 0
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x_all), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            x = x_all[idx]
            # augmentation: random shifts of up to 2 pixels
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x.to(dev)), y_all[idx].to(dev), label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if on_progress:
                on_progress(step, total, loss.item())
    bar.close()
    model.eval().cpu()
    logits, _ = classify(model, test.images)
    accuracy = float((logits.argmax(1).numpy() == test.labels).mean())
    minutes = (time.time() - start) / 60
    model.save(output_dir)
    metrics = {"test_accuracy": accuracy, "epochs": epochs, "train_samples": len(images), "minutes": round(minutes, 1)}
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(output_dir, "MODEL_CARD.md"), "w") as f:
        f.write(
            "# digit-classifier\n\nA small CNN (2 conv blocks, 128-d penultimate layer) that judges generated "
            "MNIST digits and provides features for Frechet distances.\n\n"
            f"- Command: `{_command()}`\n- Data: MNIST train ({len(images)} images, random shifts of up to 2 px); "
            "evaluated on MNIST test (10,000 images)\n"
            f"- Epochs: {epochs}, batch size {batch_size}, AdamW + one-cycle lr {learning_rate}\n"
            f"- Wall time: {minutes:.1f} min on {os.cpu_count()} CPU cores ({dev.type})\n"
            f"- MNIST test accuracy: **{accuracy * 100:.2f}%**\n"
        )
    return metrics


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _batch(data: torch.Tensor, labels: torch.Tensor, step: int, seed: int, batch_size: int, null_class: int,
           p_uncond: float, num_timesteps: int, conditional: bool):
    """The batch of one step: a function of (seed, step) only, so a resumed run sees the same data."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    idx = torch.randint(len(data), (batch_size,), generator=g)
    x0 = data[idx]
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, num_timesteps, (batch_size,), generator=g)
    y = None
    if conditional:
        y = labels[idx].clone()
        y[torch.rand(batch_size, generator=g) < p_uncond] = null_class
    return x0, noise, t, y


def train_ddpm(
    output_dir: str,
    data_dir: str | None = None,
    view=None,
    steps: int = 3000,
    batch_size: int = 128,
    learning_rate: float = 5e-4,
    warmup_steps: int = 200,
    checkpoint_every: int = 250,
    beta_schedule: str = "cosine",
    conditional: bool = True,
    p_uncond: float = 0.15,
    ema_decay: float = 0.999,
    upsample_mode: str = "bilinear",
    prediction_type: str = "v_prediction",
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    seed: int = 0,
    device: str = "auto",
    precision: str = "auto",
    resume: bool = True,
    init_from: str | None = None,
    progress: bool = True,
    on_progress: ProgressFn | None = None,
) -> dict:
    """Train a (class-conditional) DDPM on MNIST or on a view with `ground_truth` labels.

    `init_from` (the shipped "ddpm-mnist" or a pipeline folder written by this function) warm-starts
    model and EMA from its weights, architecture and noise schedule, and continues its data order.

    Writes a diffusers folder (`unet/`, `scheduler/`, `model_index.json`) with the EMA weights at
    every checkpoint; `checkpoint/state.pt` holds model, EMA and optimizer state, and a run
    started again with the same `output_dir` resumes at the step it last saved.
    """
    if steps <= 0 or batch_size <= 0 or checkpoint_every <= 0:
        raise InputError("steps, batch_size and checkpoint_every must be positive")
    if beta_schedule not in ("linear", "cosine"):
        raise InputError(f"beta_schedule must be 'linear' or 'cosine', got {beta_schedule!r}")
    if prediction_type not in PREDICTION_TYPES:
        raise InputError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if upsample_mode not in UPSAMPLE_MODES:
        raise InputError(f"upsample_mode must be one of {UPSAMPLE_MODES}, got {upsample_mode!r}")
    if precision not in ("auto", "fp32", "bf16"):
        raise InputError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if not 0.0 <= p_uncond < 1.0:
        raise InputError(f"p_uncond must be in [0, 1), got {p_uncond!r}")
    dev = resolve_device(device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(precision) or fast_dtype(dev)
    if dtype == torch.float16:
        dtype = torch.float32  # fp16 training needs loss scaling; bf16 or fp32 only
    data = _training_data(view, data_dir, size=28)
    num_classes = len(data.classes)
    x_all = torch.from_numpy(np.array(data.images)).float().div(127.5).sub(1)[:, None]
    x_all = F.pad(x_all, (2, 2, 2, 2), value=-1.0)  # 28 -> 32, black border
    y_all = torch.as_tensor(data.labels)

    torch.manual_seed(seed)  # weight init: a run is a function of its seed
    if init_from:
        unet, scheduler, init_meta = _warm_start(init_from, num_classes if conditional else None)
        unet = unet.to(dev)
    else:
        scheduler = DDPMScheduler(
            num_train_timesteps=1000,
            beta_schedule="squaredcos_cap_v2" if beta_schedule == "cosine" else "linear",
            prediction_type=prediction_type,
            clip_sample=True,
        )
        unet = DigitUNet(
            sample_size=32,
            block_out_channels=tuple(block_out_channels),
            num_class_embeds=num_classes + 1 if conditional else None,
            upsample_mode=upsample_mode,
        ).to(dev)
        init_meta = {}
    ema = [p.detach().clone() for p in unet.parameters()]
    opt = torch.optim.AdamW(unet.parameters(), lr=learning_rate, weight_decay=0.0)
    os.makedirs(output_dir, exist_ok=True)
    ckpt_dir = os.path.join(output_dir, "checkpoint")
    ckpt_path = os.path.join(ckpt_dir, "state.pt")
    start_step, elapsed, losses = 0, 0.0, []
    if resume and os.path.isfile(ckpt_path):
        state = torch.load(ckpt_path, map_location=dev, weights_only=True)
        unet.load_state_dict(state["unet"])
        for e, v in zip(ema, state["ema"], strict=True):
            e.copy_(v)
        opt.load_state_dict(state["optimizer"])
        start_step, elapsed, losses = int(state["step"]), float(state["elapsed"]), list(state["losses"])
        if init_from:  # the run continues what it started from, even if that folder has changed since
            init_meta = _recorded_init(state, output_dir) or init_meta
    if init_from:  # a warm start keeps the noise schedule of the model it began from
        beta_schedule = (init_meta.get("training") or {}).get("beta_schedule", beta_schedule)
    prior_steps = int(init_meta.get("total_steps", init_meta.get("steps", 0)))
    null_class = num_classes
    meta = {
        "classes": data.classes if conditional else None,
        "null_class": null_class if conditional else None,
        "image_size": 28,
        "training": {
            "source": data.source, "num_images": len(data.images), "batch_size": batch_size,
            "learning_rate": learning_rate, "beta_schedule": beta_schedule,
            "prediction_type": scheduler.config.prediction_type, "p_uncond": p_uncond,
            "ema_decay": ema_decay, "precision": str(dtype).replace("torch.", ""), "seed": seed,
        },
    }
    if init_from:
        meta["init_from"] = {"model": init_from, "steps": prior_steps, "training": init_meta.get("training")}

    def save(step: int) -> None:
        os.makedirs(ckpt_dir, exist_ok=True)
        _atomic_torch_save(
            {"step": step, "elapsed": elapsed, "losses": losses, "unet": unet.state_dict(), "ema": ema,
             "optimizer": opt.state_dict(), "init_meta": json.dumps(init_meta)},
            ckpt_path,
        )
        _export(unet, ema, scheduler, output_dir,
                {**meta, "steps": step, "total_steps": prior_steps + step, "wall_time_s": round(elapsed)})

    unet.train()
    bar = tqdm(total=steps, initial=start_step, desc="train-ddpm", disable=not progress)
    step = start_step
    for step in range(start_step, steps):
        t0 = time.time()
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, learning_rate, warmup_steps)
        x0, noise, t, y = _batch(x_all, y_all, prior_steps + step, seed, batch_size, null_class, p_uncond,
                                 scheduler.config.num_train_timesteps, conditional)
        x0, noise, t = x0.to(dev), noise.to(dev), t.to(dev)
        xt = q_sample(x0, t, noise, scheduler.alphas_cumprod)
        with autocast(dev, dtype):
            pred = unet(xt, t, class_labels=None if y is None else y.to(dev)).sample
        target = noise if scheduler.config.prediction_type == "epsilon" else velocity(
            x0, noise, t, scheduler.alphas_cumprod)
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in unet.parameters()], 1 - decay)
        losses.append(round(loss.item(), 5))
        elapsed += time.time() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if on_progress:
            on_progress(step + 1, steps, loss.item())
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            save(step + 1)
    bar.close()
    if start_step >= steps:  # nothing left to train: make sure the export exists
        save(start_step)
    return {"output_dir": output_dir, "steps": steps, "resumed_from": start_step,
            "final_loss": float(np.mean(losses[-100:])) if losses else None, "wall_time_s": round(elapsed)}


def _recorded_init(state: dict, output_dir: str) -> dict | None:
    """The metadata of the model a resumed warm-started run began from: its checkpoint's copy, else its export's."""
    if state.get("init_meta"):
        return json.loads(state["init_meta"])
    path = os.path.join(output_dir, "fiftyone_diffusion.json")
    if os.path.isfile(path):
        with open(path) as f:
            init = json.load(f).get("init_from")
        if init:
            return {"total_steps": init["steps"], "training": init.get("training")}
    return None


def _warm_start(init_from: str, num_classes: int | None) -> tuple[DigitUNet, DDPMScheduler, dict]:
    """A trainable copy of a DDPM pipeline's UNet, its scheduler and its training metadata."""
    from fiftyone_diffusion.plugins.ddpm import load_ddpm

    loaded = load_ddpm(init_from)
    if not isinstance(loaded.unet, DigitUNet):
        raise InputError(f"init_from={init_from!r} is not a DigitUNet pipeline written by train-ddpm")
    expected = num_classes + 1 if num_classes else None
    if loaded.unet.config.num_class_embeds != expected:
        raise InputError(f"init_from={init_from!r} has {loaded.unet.config.num_class_embeds} class embeddings; "
                         f"this data needs {expected}")
    config = {k: v for k, v in loaded.unet.config.items() if k != "_name_or_path"}  # no local paths in exports
    unet = DigitUNet.from_config(config)
    unet.load_state_dict(loaded.unet.state_dict())
    return unet, DDPMScheduler.from_config(loaded.scheduler_config), dict(loaded.extra)


def _export(unet: DigitUNet, ema: list[torch.Tensor], scheduler: DDPMScheduler, output_dir: str, meta: dict) -> None:
    """Write the EMA weights as a diffusers DDPM pipeline folder (atomically per file)."""
    backup = [p.detach().clone() for p in unet.parameters()]
    with torch.no_grad():
        for p, e in zip(unet.parameters(), ema, strict=True):
            p.copy_(e)
    try:
        tmp = os.path.join(output_dir, ".export-tmp")
        unet.save_pretrained(os.path.join(tmp, "unet"))
        scheduler.save_pretrained(os.path.join(tmp, "scheduler"))
        with open(os.path.join(tmp, "model_index.json"), "w") as f:
            json.dump({"_class_name": "DDPMPipeline", "_diffusers_version": "0.42.1",
                       "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}, f, indent=2)
        with open(os.path.join(tmp, "fiftyone_diffusion.json"), "w") as f:
            json.dump(meta, f, indent=2)
        for name in ("unet", "scheduler", "model_index.json", "fiftyone_diffusion.json"):
            dst = os.path.join(output_dir, name)
            if os.path.isdir(dst):
                import shutil

                shutil.rmtree(dst)
            os.replace(os.path.join(tmp, name), dst)
        os.rmdir(tmp)
    finally:
        with torch.no_grad():
            for p, b in zip(unet.parameters(), backup, strict=True):
                p.copy_(b)
