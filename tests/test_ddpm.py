"""DDPM training (resume, diffusers output) and generation into datasets, with tiny models."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fiftyone_diffusion.errors import InputError

CLI = os.path.join(os.path.dirname(sys.executable), "fiftyone-diffusion")

TINY = dict(block_out_channels=(32, 32, 32), batch_size=4, checkpoint_every=1, progress=False)


def _ema(folder: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


def test_training_resumes_at_the_same_step_and_matches_an_uninterrupted_run(tmp_path, mnist_dir):
    from fiftyone_diffusion import train_ddpm

    interrupted, straight = str(tmp_path / "a"), str(tmp_path / "b")
    train_ddpm(interrupted, data_dir=mnist_dir, steps=2, **TINY)
    result = train_ddpm(interrupted, data_dir=mnist_dir, steps=4, **TINY)
    assert result["resumed_from"] == 2
    state = torch.load(os.path.join(interrupted, "checkpoint", "state.pt"), weights_only=True)
    assert state["step"] == 4 and len(state["losses"]) == 4 and state["optimizer"]["state"]
    train_ddpm(straight, data_dir=mnist_dir, steps=4, **TINY)
    a, b = _ema(interrupted), _ema(straight)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_killed_training_resumes_from_its_last_checkpoint(tmp_path, mnist_dir):
    out = str(tmp_path / "killed")
    cmd = [CLI, "train-ddpm", "--output-dir", out, "--data-dir",
           mnist_dir, "--steps", "400", "--batch-size", "2", "--checkpoint-every", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = os.path.join(out, "checkpoint", "state.pt")
    import time

    deadline = time.time() + 120
    while time.time() < deadline:
        if os.path.isfile(ckpt) and torch.load(ckpt, weights_only=True)["step"] >= 2:
            break
        time.sleep(0.5)
    proc.kill()
    proc.wait()
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 2 <= step < 400
    cmd[cmd.index("--steps") + 1] = str(step + 1)
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert f'"resumed_from": {step}' in done.stdout


def test_warm_start_continues_from_a_trained_folder(tmp_path, mnist_dir, tiny_ddpm):
    import json

    from fiftyone_diffusion import train_ddpm

    out = str(tmp_path / "warm")
    train_ddpm(out, data_dir=mnist_dir, steps=1, learning_rate=0.0, init_from=tiny_ddpm,
               **{**TINY, "block_out_channels": (64, 64, 64)})  # architecture comes from init_from
    start, warm = _ema(tiny_ddpm), _ema(out)
    assert start.keys() == warm.keys() and all(torch.equal(start[k], warm[k]) for k in start)
    with open(os.path.join(out, "fiftyone_diffusion.json")) as f:
        meta = json.load(f)
    assert meta["init_from"]["steps"] == 2 and meta["steps"] == 1 and meta["total_steps"] == 3
    with open(os.path.join(out, "unet", "config.json")) as f:
        assert "_name_or_path" not in json.load(f)  # the export carries no local path
    with pytest.raises(InputError, match="class embeddings"):
        train_ddpm(str(tmp_path / "bad"), data_dir=mnist_dir, steps=1, conditional=False, init_from=tiny_ddpm,
                   **TINY)


def test_resumed_warm_start_keeps_the_step_count_it_started_from(tmp_path, mnist_dir, tiny_ddpm):
    import json
    import shutil

    from fiftyone_diffusion import train_ddpm

    init, out = str(tmp_path / "init"), str(tmp_path / "warm")
    shutil.copytree(tiny_ddpm, init)
    train_ddpm(out, data_dir=mnist_dir, steps=1, init_from=init, **TINY)  # tiny_ddpm: 2 steps
    meta_path = os.path.join(init, "fiftyone_diffusion.json")
    with open(meta_path) as f:
        init_meta = json.load(f)
    with open(meta_path, "w") as f:  # the init folder moves on (say, this run's result is shipped there)
        json.dump({**init_meta, "steps": 50, "total_steps": 50}, f)

    def exported() -> dict:
        with open(os.path.join(out, "fiftyone_diffusion.json")) as f:
            return json.load(f)

    result = train_ddpm(out, data_dir=mnist_dir, steps=2, init_from=init, **TINY)
    assert result["resumed_from"] == 1
    assert exported()["init_from"]["steps"] == 2 and exported()["total_steps"] == 4
    # checkpoints written before the record existed: the run's own export tells where it began
    state_path = os.path.join(out, "checkpoint", "state.pt")
    state = torch.load(state_path, weights_only=True)
    del state["init_meta"]
    torch.save(state, state_path)
    assert train_ddpm(out, data_dir=mnist_dir, steps=3, init_from=init, **TINY)["resumed_from"] == 2
    assert exported()["init_from"]["steps"] == 2 and exported()["total_steps"] == 5


def test_output_is_a_plain_diffusers_folder(tiny_ddpm):
    from diffusers import DDPMScheduler, UNet2DModel

    unet, info = UNet2DModel.from_pretrained(tiny_ddpm, subfolder="unet", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    scheduler = DDPMScheduler.from_pretrained(tiny_ddpm, subfolder="scheduler")
    assert scheduler.config.num_train_timesteps == 1000 and unet.config.num_class_embeds == 11


def test_train_on_a_fiftyone_view(tmp_path, mnist_dir, dataset_name):
    from fiftyone_diffusion import load_mnist, train_ddpm
    from fiftyone_diffusion.plugins.ddpm import load_ddpm

    view = load_mnist(dataset_name, "test", max_samples=30, data_dir=mnist_dir)
    train_ddpm(str(tmp_path), view=view, steps=1, **TINY)
    model = load_ddpm(str(tmp_path))
    assert model.classes == sorted(set(view.values("ground_truth.label")), key=int)


def test_v_prediction_math_matches_diffusers_and_recovers_noise_and_image():
    from diffusers import DDPMScheduler

    from fiftyone_diffusion.plugins.noise import noise_from_output, predict_start_from_noise, q_sample, velocity

    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 300, 900, 999])
    v = velocity(x0, noise, t, sched.alphas_cumprod)
    torch.testing.assert_close(v, sched.get_velocity(x0, noise, t))
    xt = q_sample(x0, t, noise, sched.alphas_cumprod)
    eps = noise_from_output(xt, t, v, sched.alphas_cumprod, "v_prediction")
    torch.testing.assert_close(eps, noise, atol=1e-4, rtol=0)
    torch.testing.assert_close(predict_start_from_noise(xt[:3], t[:3], eps[:3], sched.alphas_cumprod), x0[:3],
                               atol=1e-3, rtol=0)
    assert noise_from_output(xt, t, v, sched.alphas_cumprod, "epsilon") is v


def test_prediction_type_is_trained_recorded_and_inherited_by_every_sampler(tmp_path, mnist_dir, tiny_ddpm):
    from fiftyone_diffusion import train_ddpm
    from fiftyone_diffusion.plugins.ddpm import SAMPLERS, load_ddpm, make_scheduler, sample

    for folder, expected in ((tiny_ddpm, "v_prediction"), (str(tmp_path / "eps"), "epsilon")):
        if expected == "epsilon":
            train_ddpm(folder, data_dir=mnist_dir, steps=1, prediction_type="epsilon", **TINY)
        model = load_ddpm(folder)
        assert model.scheduler_config["prediction_type"] == expected
        for name in SAMPLERS:
            assert make_scheduler(name, model.scheduler_config).config.prediction_type == expected
        images = sample(model, [0, 1], "dpmsolver++", 2, [3, None], 2.0)
        assert images.shape == (2, 1, 28, 28) and torch.isfinite(images).all()
    with pytest.raises(InputError, match="prediction_type"):
        train_ddpm(str(tmp_path / "bad"), data_dir=mnist_dir, steps=1, prediction_type="sample", **TINY)
    with pytest.raises(InputError, match="p_uncond"):
        train_ddpm(str(tmp_path / "bad"), data_dir=mnist_dir, steps=1, p_uncond=1.0, **TINY)
    assert not os.path.exists(tmp_path / "bad")


def test_samplers_are_diffusers_schedulers_without_ddim_clipping(tiny_ddpm):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    from fiftyone_diffusion.plugins.ddpm import load_ddpm, make_scheduler

    cfg = load_ddpm(tiny_ddpm).scheduler_config
    assert isinstance(make_scheduler("ddpm", cfg), DDPMScheduler)
    ddim = make_scheduler("ddim", cfg)
    assert isinstance(ddim, DDIMScheduler) and ddim.config.clip_sample is False
    dpm = make_scheduler("dpmsolver++", cfg)
    assert isinstance(dpm, DPMSolverMultistepScheduler) and dpm.config.algorithm_type == "dpmsolver++"
    sde = make_scheduler("dpmsolver++-sde", cfg)
    assert isinstance(sde, DPMSolverMultistepScheduler) and sde.config.algorithm_type == "sde-dpmsolver++"


def test_stochastic_dpm_solver_draws_each_samples_noise_from_its_own_seed(tiny_ddpm):
    from fiftyone_diffusion.plugins.ddpm import load_ddpm, sample

    model = load_ddpm(tiny_ddpm)
    batch = sample(model, [5, 6, 7], "dpmsolver++-sde", 4)
    alone = sample(model, [6], "dpmsolver++-sde", 4)
    # same seed, same image in or out of a batch (up to float rounding of batched convolutions; the
    # regeneration test below checks the stored 8-bit PNGs are bit-identical)
    torch.testing.assert_close(batch[1:2], alone, atol=1e-4, rtol=0)
    assert (batch[0] - batch[1]).abs().max() > 1e-2
    ode = sample(model, [6], "dpmsolver++", 4)
    assert (alone - ode).abs().max() > 1e-3  # the SDE variant really injects noise


def _png(path: str) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.mark.parametrize("sampler", ["dpmsolver++", "ddpm", "ddim", "dpmsolver++-sde"])
def test_generation_stores_recipe_trajectory_prediction_and_regenerates(tiny_ddpm, dataset_name, sampler):
    import fiftyone as fo

    from fiftyone_diffusion import generate_ddpm_samples
    from fiftyone_diffusion.brain.generation import regenerate_ddpm_sample

    result = generate_ddpm_samples(dataset_name, num_samples=5, model=tiny_ddpm, sampler=sampler, steps=4,
                                   seed=11, label=7, batch_size=2, trajectory_steps=3, progress=False)
    ds = fo.load_dataset(dataset_name)
    assert result["created"] == 5 and len(ds) == 5
    samples = list(ds.sort_by("generation.seed"))
    assert [s.generation.seed for s in samples] == [11, 12, 13, 14, 15]
    for s in samples:
        assert "generated" in s.tags
        assert s.generation.sampler == sampler and s.generation.steps == 4 and s.generation.label == "7"
        assert s.generation.model == tiny_ddpm and s.generation.guidance_scale == 3.0
        assert s.generation.created_at is not None
        assert isinstance(s.prediction, fo.Classification) and len(s.prediction.logits) == 10
        assert 0.0 < s.prediction.confidence <= 1.0
        assert _png(s.filepath).shape == (28, 28)
        tr = s.trajectory
        assert tr.num_frames == 3 and len(tr.pixel_std) == 4 and len(tr.eps_norm) == 4
        assert _png(tr.frames_path).shape == (2 * 28, 3 * 28)
    # sample 14 came out of a batch of two; it regenerates alone, bit-identically
    again = regenerate_ddpm_sample(samples[3])
    assert np.array_equal(again, _png(samples[3].filepath))
    assert not np.array_equal(_png(samples[0].filepath), _png(samples[1].filepath))


def test_unconditional_rgb_folder_in_the_ddpm_cifar10_format(tmp_path, dataset_name):
    import fiftyone as fo
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from fiftyone_diffusion import generate_ddpm_samples

    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(tmp_path / "cifar")
    generate_ddpm_samples(dataset_name, num_samples=2, model=str(tmp_path / "cifar"), steps=2, progress=False)
    ds = fo.load_dataset(dataset_name)
    sample = ds.first()
    assert _png(sample.filepath).shape == (32, 32, 3)
    assert sample.has_field("prediction") is False or sample.prediction is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_samples=0), "num_samples"),
        (dict(num_samples=10**9), "num_samples"),
        (dict(steps=0), "steps"),
        (dict(sampler="euler"), "unknown sampler"),
        (dict(label=12), "label"),
        (dict(label="seven"), "random"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(model="/nonexistent/ddpm"), "does not exist"),
        (dict(media_dir="/proc/forbidden"), "not writable"),
    ],
)
def test_bad_input_fails_before_anything_is_written(tiny_ddpm, dataset_name, tmp_path, kwargs, message):
    import fiftyone as fo

    from fiftyone_diffusion import generate_ddpm_samples

    args = dict(num_samples=2, model=tiny_ddpm, steps=2, media_dir=str(tmp_path / "media"), progress=False)
    args.update(kwargs)
    with pytest.raises(InputError, match=message):
        generate_ddpm_samples(dataset_name, **args)
    assert not fo.dataset_exists(dataset_name) or len(fo.load_dataset(dataset_name)) == 0
    assert not (tmp_path / "media").exists() or not os.listdir(tmp_path / "media")


def test_a_folder_that_is_not_a_ddpm_is_rejected(tmp_path, dataset_name):
    from fiftyone_diffusion import generate_ddpm_samples

    (tmp_path / "notddpm").mkdir()
    with pytest.raises(InputError, match="not a DDPM pipeline folder"):
        generate_ddpm_samples(dataset_name, num_samples=1, model=str(tmp_path / "notddpm"), progress=False)


def test_failure_half_way_keeps_complete_batches_and_no_orphans(tiny_ddpm, dataset_name, tmp_path, monkeypatch):
    import fiftyone as fo

    from fiftyone_diffusion import generate_ddpm_samples
    from fiftyone_diffusion.brain import generation

    calls = {"n": 0}
    real = generation.atomic_save_image

    def flaky(image, path):
        calls["n"] += 1
        if calls["n"] == 6:  # image + trajectory per sample: the 3rd sample, in the 2nd batch
            raise OSError("disk full")
        return real(image, path)

    monkeypatch.setattr(generation, "atomic_save_image", flaky)
    media = tmp_path / "media"
    with pytest.raises(OSError, match="disk full"):
        generate_ddpm_samples(dataset_name, num_samples=6, model=tiny_ddpm, steps=2, batch_size=2,
                              media_dir=str(media), progress=False)
    ds = fo.load_dataset(dataset_name)
    assert len(ds) == 2
    on_disk = {str(p) for p in media.rglob("*.png")}
    in_dataset = set(ds.values("filepath")) | set(ds.values("trajectory.frames_path"))
    assert on_disk == in_dataset


def test_train_operator_warm_starts_with_label_dropout(tiny_ddpm, mnist_dir, tmp_path):
    import json

    from fiftyone.operators import execute_operator

    out = str(tmp_path / "op-run")
    execute_operator("@fiftyone-diffusion/diffusion/train_ddpm",
                     params={"output_dir": out, "source": "MNIST", "data_dir": mnist_dir, "steps": 1,
                             "batch_size": 2, "init_from": tiny_ddpm, "p_uncond": 0.5, "device": "cpu"})
    with open(os.path.join(out, "fiftyone_diffusion.json")) as f:
        meta = json.load(f)
    assert meta["training"]["p_uncond"] == 0.5 and meta["init_from"]["model"] == tiny_ddpm and meta["steps"] == 1


def test_operator_and_cli_generate_into_a_dataset(tiny_ddpm, dataset_name):
    import fiftyone as fo
    from fiftyone.operators import execute_operator

    execute_operator("@fiftyone-diffusion/diffusion/generate_ddpm_samples",
                     params={"dataset": dataset_name, "num_samples": 3, "model": tiny_ddpm, "steps": 2,
                             "label": 3, "batch_size": 2})
    assert len(fo.load_dataset(dataset_name)) == 3
    proc = subprocess.run([CLI, "generate-ddpm-samples", "--dataset",
                           dataset_name, "--num-samples", "2", "--model", tiny_ddpm, "--steps", "2", "--seed", "100"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert len(fo.load_dataset(dataset_name)) == 5
    bad = subprocess.run([CLI, "generate-ddpm-samples", "--dataset",
                          dataset_name, "--num-samples", "0", "--model", tiny_ddpm], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: num_samples")


def test_run_killed_with_sigkill_resumes_without_duplicates_or_orphans(tiny_ddpm, dataset_name, tmp_path):
    import signal
    import time

    import fiftyone as fo

    media = tmp_path / "media"
    cmd = [CLI, "generate-ddpm-samples", "--dataset", dataset_name, "--num-samples", "40", "--model", tiny_ddpm,
           "--steps", "2", "--batch-size", "2", "--media-dir", str(media), "--run-key", "killme"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(media.glob("killme_*.png"))) < 7:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ds = fo.load_dataset(dataset_name)
    before = len(ds)
    assert 0 < before < 40
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ds.reload()
    assert len(ds) == 40
    assert sorted(ds.values("generation.index")) == list(range(40))
    on_disk = {str(p) for p in media.rglob("*") if p.is_file()}
    assert on_disk == set(ds.values("filepath")) | set(ds.values("trajectory.frames_path"))
    assert f'"resumed": {before}' in done.stdout


def test_resume_with_other_settings_is_refused(tiny_ddpm, dataset_name):
    from fiftyone_diffusion import generate_ddpm_samples

    generate_ddpm_samples(dataset_name, num_samples=1, model=tiny_ddpm, steps=2, run_key="r1", progress=False)
    with pytest.raises(InputError, match="run_key 'r1' was started with steps=2"):
        generate_ddpm_samples(dataset_name, num_samples=2, model=tiny_ddpm, steps=3, run_key="r1", progress=False)


def test_batch_labels_resolve_one_class_for_all_or_draw_one_per_seed(tiny_ddpm):
    from fiftyone_diffusion.brain.generation import batch_labels, drawn_label
    from fiftyone_diffusion.plugins.ddpm import load_ddpm

    model = load_ddpm(tiny_ddpm)
    assert batch_labels(model, [1, 2], "7") == batch_labels(model, [1, 2], 7) == [7, 7]
    assert batch_labels(model, [1, 2], None) == [None, None]
    assert batch_labels(model, [5, 6, 7], "random") == [drawn_label(s, 10) for s in (5, 6, 7)]
    with pytest.raises(InputError, match="not one of the model's classes"):
        batch_labels(model, [1], "11")


def test_random_label_draws_a_class_per_sample_from_its_seed_and_regenerates(tiny_ddpm, dataset_name, tmp_path,
                                                                            mnist_dir):
    import fiftyone as fo
    from fiftyone import ViewField as F
    from fiftyone.operators import execute_operator

    from fiftyone_diffusion import generate_ddpm_samples
    from fiftyone_diffusion.brain.generation import drawn_label, regenerate_ddpm_sample

    generate_ddpm_samples(dataset_name, num_samples=3, model=tiny_ddpm, steps=2, seed=5, label="random",
                          guidance_scale=2.0, batch_size=2, run_key="rnd", trajectory_steps=0, progress=False)
    generate_ddpm_samples(dataset_name, num_samples=12, model=tiny_ddpm, steps=2, seed=5, label="random",
                          guidance_scale=2.0, batch_size=4, run_key="rnd", trajectory_steps=0, progress=False)
    samples = list(fo.load_dataset(dataset_name).sort_by("generation.index"))
    gens = [s.generation for s in samples]
    assert [g.index for g in gens] == list(range(12))  # resumed with label="random": no duplicates
    assert [g.label for g in gens] == [str(drawn_label(5 + i, 10)) for i in range(12)]
    assert len({g.label for g in gens}) > 3 and all(g.label_drawn and g.guidance_scale == 2.0 for g in gens)
    assert np.array_equal(regenerate_ddpm_sample(samples[7]), _png(samples[7].filepath))
    execute_operator("@fiftyone-diffusion/diffusion/generate_ddpm_samples",
                     params={"dataset": dataset_name, "num_samples": 13, "model": tiny_ddpm, "steps": 2, "seed": 5,
                             "random_label": True, "guidance_scale": 2.0, "run_key": "rnd", "trajectory_steps": 0})
    last = fo.load_dataset(dataset_name).match(F("generation.index") == 12).first().generation
    assert last.label == str(drawn_label(17, 10)) and last.label_drawn
    with pytest.raises(InputError, match="started with label='random', not None"):
        generate_ddpm_samples(dataset_name, num_samples=14, model=tiny_ddpm, steps=2, seed=5,
                              guidance_scale=2.0, run_key="rnd", trajectory_steps=0, progress=False)

    uncond = str(tmp_path / "uncond")
    from fiftyone_diffusion import train_ddpm

    train_ddpm(uncond, data_dir=mnist_dir, steps=1, conditional=False, **TINY)
    with pytest.raises(InputError, match="unconditional"):
        generate_ddpm_samples(dataset_name, num_samples=1, model=uncond, label="random", progress=False)


def test_out_of_memory_halves_the_batch_and_retries(tiny_ddpm, dataset_name, monkeypatch):
    import fiftyone as fo

    from fiftyone_diffusion import generate_ddpm_samples
    from fiftyone_diffusion.brain import generation

    real = generation.sample

    def small_memory(model, seeds, *args, **kwargs):
        if len(seeds) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, seeds, *args, **kwargs)

    monkeypatch.setattr(generation, "sample", small_memory)
    result = generate_ddpm_samples(dataset_name, num_samples=5, model=tiny_ddpm, steps=2, batch_size=8,
                                   progress=False)
    assert result["batch_size"] == 2 and result["created"] == 5
    assert len(fo.load_dataset(dataset_name)) == 5


def test_bf16_samples_regenerate_bit_identically_from_a_batch(tiny_ddpm, dataset_name):
    """bf16 kernels round differently per batch shape: regeneration repeats the sample's batch size."""
    import fiftyone as fo

    from fiftyone_diffusion import generate_ddpm_samples
    from fiftyone_diffusion.brain.generation import regenerate_ddpm_sample

    generate_ddpm_samples(dataset_name, num_samples=5, model=tiny_ddpm, steps=3, batch_size=3, precision="bf16",
                          trajectory_steps=0, progress=False)
    samples = list(fo.load_dataset(dataset_name).sort_by("generation.seed"))
    assert [s.generation.batch_size for s in samples] == [3, 3, 3, 2, 2]
    for s in samples:
        assert s.generation.precision == "bf16"
        assert np.array_equal(regenerate_ddpm_sample(s), _png(s.filepath))
