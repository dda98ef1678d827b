"""Forward diffusion q(x_t | x_0) against its closed form, and forward trajectories stored for datasets."""

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


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_forward_diffusion_matches_the_closed_form_over_many_seeds(schedule):
    from fiftyone_diffusion.brain.trajectory import forward_diffusion, noise_schedule

    x0 = torch.rand(1, 6, 6, generator=torch.Generator().manual_seed(1)) * 2 - 1
    n = 1000
    frames = torch.stack([forward_diffusion(x0, schedule=schedule, seed=s).frames for s in range(n)]).double()
    traj = forward_diffusion(x0, schedule=schedule)
    abar = noise_schedule(schedule).alphas_cumprod.double()
    assert traj.timesteps == [-1, 199, 399, 599, 799, 999]
    for k, t in enumerate(traj.timesteps):
        a = 1.0 if t < 0 else float(abar[t])
        assert traj.alpha_bars[k] == pytest.approx(a, rel=1e-6)
        mean, var = frames[:, k].mean(0), frames[:, k].var(0)
        # per pixel: the mean within 5 standard errors, the variance (averaged over pixels) within 10 %
        assert torch.all((mean - a**0.5 * x0.double()).abs() <= 5 * ((1 - a) / n) ** 0.5 + 1e-6)
        assert float(var.mean()) == pytest.approx(1 - a, rel=0.1, abs=1e-9)
    assert torch.equal(frames[0, 0].float(), x0)  # level 0 is the clean image


def test_forward_diffusion_is_deterministic_per_seed_and_checks_its_input():
    from fiftyone_diffusion.brain.trajectory import forward_diffusion

    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    a, b, c = (forward_diffusion(image, (0.5, 1.0), seed=s).frames for s in (3, 3, 4))
    assert a.shape == (2, 3, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        forward_diffusion(image, (0.5, 1.5))
    with pytest.raises(InputError, match="unknown schedule"):
        forward_diffusion(image, schedule="quadratic")


def _rgb_dataset(name: str, folder) -> object:
    import fiftyone as fo

    rng = np.random.default_rng(0)
    ds = fo.Dataset(name)
    samples = []
    for i, size in enumerate([(40, 30), (600, 300)]):
        path = str(folder / f"rgb{i}.png")
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        samples.append(fo.Sample(filepath=path))
    ds.add_samples(samples)
    return ds


def test_compute_forward_trajectory_for_grayscale_and_rgb_images(tmp_path, mnist_dir, dataset_name):
    import fiftyone as fo

    from fiftyone_diffusion import compute_forward_trajectory, load_mnist

    gray = load_mnist(dataset_name, "test", max_samples=3, data_dir=mnist_dir, media_dir=str(tmp_path / "mnist"))
    result = compute_forward_trajectory(gray, media_dir=str(tmp_path / "fwd"), progress=False)
    assert result["computed"] == 3
    for s in gray:
        tr = s.forward_trajectory
        assert tr.noise_levels == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0] and tr.space == "pixel" and tr.num_frames == 6
        strip = np.asarray(Image.open(tr.frames_path))
        assert strip.shape == (28, 6 * 28)  # grayscale stays grayscale
        assert np.array_equal(strip[:, :28], np.asarray(Image.open(s.filepath)))  # level 0: the image itself
        assert strip[:, -28:].std() > 40  # level 1: (almost) pure noise
    rgb = _rgb_dataset(dataset_name + "-rgb", tmp_path)
    try:
        compute_forward_trajectory(rgb, noise_levels=[0.0, 0.5], schedule="cosine", max_size=64, progress=False)
        small, big = rgb.values("forward_trajectory")
        assert np.asarray(Image.open(small.frames_path)).shape == (30, 80, 3)
        assert np.asarray(Image.open(big.frames_path)).shape == (32, 128, 3)  # shrunk to max_size
        assert big.timesteps == [-1, 499] and big.schedule == "cosine"
    finally:
        fo.delete_dataset(rgb.name)


def test_bad_input_fails_before_anything_is_written(tmp_path, mnist_dir, dataset_name):
    import fiftyone as fo

    from fiftyone_diffusion import compute_forward_trajectory, load_mnist

    ds = load_mnist(dataset_name, "test", max_samples=2, data_dir=mnist_dir, media_dir=str(tmp_path / "mnist"))
    media = tmp_path / "fwd"
    for kwargs, message in [(dict(noise_levels=[2.0]), "noise levels"), (dict(schedule="nope"), "schedule"),
                            (dict(vae=str(tmp_path / "novae")), "does not exist")]:
        with pytest.raises(InputError, match=message):
            compute_forward_trajectory(ds, media_dir=str(media), progress=False, **kwargs)
    with pytest.raises(InputError, match="empty"):
        compute_forward_trajectory(ds.limit(0), media_dir=str(media), progress=False)
    assert not media.exists() and not ds.has_field("forward_trajectory")
    assert not fo.load_dataset(dataset_name).has_field("forward_trajectory")


def test_latent_space_through_a_vae_folder(tmp_path, mnist_dir, dataset_name):
    from diffusers import AutoencoderKL

    from fiftyone_diffusion import compute_forward_trajectory, load_mnist

    AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                  norm_num_groups=8).save_pretrained(tmp_path / "vae")
    ds = load_mnist(dataset_name, "test", max_samples=1, data_dir=mnist_dir, media_dir=str(tmp_path / "mnist"))
    compute_forward_trajectory(ds, noise_levels=[0.0, 1.0], vae=str(tmp_path / "vae"), progress=False)
    tr = ds.first().forward_trajectory
    assert tr.space == "latent" and tr.vae == str(tmp_path / "vae")
    assert np.asarray(Image.open(tr.frames_path)).shape == (28, 56, 3)  # decoded frames, RGB VAE


@pytest.mark.slow
def test_operator_and_cli(tmp_path, mnist_dir, dataset_name):
    import fiftyone as fo
    from fiftyone.operators import execute_operator

    from fiftyone_diffusion import load_mnist

    load_mnist(dataset_name, "test", max_samples=2, data_dir=mnist_dir, media_dir=str(tmp_path / "mnist"))
    result = execute_operator("@fiftyone-diffusion/diffusion/compute_forward_trajectory", dataset=dataset_name,
                              params={"noise_levels": "0, 0.5, 1", "seed": 3})
    assert result.error is None, result.error_message
    ds = fo.load_dataset(dataset_name)
    assert ds.values("forward_trajectory.seed") == [3, 3]
    assert ds.values("forward_trajectory.num_frames") == [3, 3]
    proc = subprocess.run([CLI, "compute-forward-trajectory", "--dataset", dataset_name, "--noise-levels", "0.1,0.9"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    ds.reload()
    assert ds.values("forward_trajectory.noise_levels") == [[0.1, 0.9]] * 2
    bad = subprocess.run([CLI, "compute-forward-trajectory", "--dataset", dataset_name, "--noise-levels", "0,x"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: noise levels")
