"""Autoguidance of unconditional DDPM samples by a weaker guide model, with tiny models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fiftyone_diffusion.errors import InputError

CLI = os.path.join(os.path.dirname(sys.executable), "fiftyone-diffusion")


def _weaker_copy(src: str, dst: str) -> str:
    """A copy of a DDPM folder whose U-Net weights are perturbed: a different model of the same kind."""
    from fiftyone_diffusion.plugins.unet import DigitUNet

    shutil.copytree(src, dst)
    unet = DigitUNet.from_pretrained(src, subfolder="unet")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unet.save_pretrained(os.path.join(dst, "unet"))
    return dst


@pytest.fixture(scope="module")
def guided_ddpm(tiny_ddpm, tmp_path_factory) -> tuple[str, str]:
    """(model folder that recommends a guide, the guide folder)."""
    root = tmp_path_factory.mktemp("autoguide")
    guide = _weaker_copy(tiny_ddpm, str(root / "guide"))
    model = str(root / "model")
    shutil.copytree(tiny_ddpm, model)
    meta_path = os.path.join(model, "fiftyone_diffusion.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["autoguidance"] = {"guide": guide, "scale": 2.0}
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    return model, guide


def _first_step_noise(model, guide, scale: float) -> torch.Tensor:
    from fiftyone_diffusion.plugins.ddpm import sample

    seen = []
    sample(model, [3, 4], "ddim", 2, None, on_step=lambda r: seen.append(r.eps.clone()), guide=guide,
           guide_scale=scale)
    return seen[0]


def test_autoguidance_extrapolates_from_the_guide_towards_the_model(guided_ddpm):
    from fiftyone_diffusion.plugins.ddpm import load_ddpm

    model, guide = load_ddpm(guided_ddpm[0]), load_ddpm(guided_ddpm[1])
    plain = _first_step_noise(model, None, 1.0)
    e1, e2, e3 = (_first_step_noise(model, guide, w) for w in (1.0, 2.0, 3.0))
    torch.testing.assert_close(e1, plain)  # scale 1 is the model alone
    torch.testing.assert_close(_first_step_noise(model, model, 3.0), plain)  # a model guiding itself: no change
    assert (e2 - e1).abs().max() > 1e-4
    # guide + w * (model - guide) is affine in w
    torch.testing.assert_close(e3 - e1, 2 * (e2 - e1), atol=1e-4, rtol=1e-4)


def test_auto_takes_the_recommended_guide_for_unconditional_samples_only(guided_ddpm, tiny_ddpm):
    from fiftyone_diffusion.brain.generation import resolve_autoguide
    from fiftyone_diffusion.plugins.ddpm import load_ddpm

    model = load_ddpm(guided_ddpm[0])
    guide, scale = resolve_autoguide(model, "auto", None, True, "cpu")
    assert guide.name == guided_ddpm[1] and scale == 2.0
    assert resolve_autoguide(model, "auto", 3.5, True, "cpu")[1] == 3.5
    assert resolve_autoguide(model, "auto", None, False, "cpu") == (None, None)  # conditional: CFG only
    assert resolve_autoguide(model, None, None, True, "cpu") == (None, None)
    assert resolve_autoguide(model, "none", None, True, "cpu") == (None, None)
    assert resolve_autoguide(load_ddpm(tiny_ddpm), "auto", None, True, "cpu") == (None, None)  # none recommended
    with pytest.raises(InputError, match="unconditional"):
        resolve_autoguide(model, guided_ddpm[1], None, False, "cpu")
    with pytest.raises(InputError, match="autoguide_scale"):
        resolve_autoguide(model, "auto", -1.0, True, "cpu")
    # a scale that could not apply is refused rather than ignored
    with pytest.raises(InputError, match="unconditional"):
        resolve_autoguide(model, "auto", 2.0, False, "cpu")
    with pytest.raises(InputError, match="recommends no autoguidance guide"):
        resolve_autoguide(load_ddpm(tiny_ddpm), "auto", 2.0, True, "cpu")


def test_a_guide_of_another_kind_is_refused_before_anything_is_written(tiny_ddpm, dataset_name, tmp_path):
    import fiftyone as fo

    from fiftyone_diffusion import generate_ddpm_samples

    other = str(tmp_path / "epsilon")
    shutil.copytree(tiny_ddpm, other)
    path = os.path.join(other, "scheduler", "scheduler_config.json")
    with open(path) as f:
        config = json.load(f)
    config["prediction_type"] = "epsilon"
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(InputError, match="prediction_type"):
        generate_ddpm_samples(dataset_name, num_samples=2, model=tiny_ddpm, steps=2, autoguide_model=other,
                              media_dir=str(tmp_path / "media"), progress=False)
    assert not fo.dataset_exists(dataset_name) or len(fo.load_dataset(dataset_name)) == 0
    assert not (tmp_path / "media").exists() or not os.listdir(tmp_path / "media")


def test_autoguided_samples_record_their_guide_and_regenerate(guided_ddpm, dataset_name):
    import fiftyone as fo

    from fiftyone_diffusion import generate_ddpm_samples
    from fiftyone_diffusion.brain.generation import regenerate_ddpm_sample

    model, guide = guided_ddpm
    result = generate_ddpm_samples(dataset_name, num_samples=3, model=model, steps=3, seed=5, batch_size=2,
                                   trajectory_steps=0, progress=False)
    assert result["autoguide_model"] == guide and result["autoguide_scale"] == 2.0
    plain = generate_ddpm_samples(dataset_name, num_samples=3, model=model, steps=3, seed=5, batch_size=2,
                                  trajectory_steps=0, autoguide_model=None, progress=False)
    ds = fo.load_dataset(dataset_name)
    guided = list(ds.match({"generation.run_key": result["run_key"]}).sort_by("generation.seed"))
    unguided = list(ds.match({"generation.run_key": plain["run_key"]}).sort_by("generation.seed"))
    assert [s.generation.autoguide_model for s in guided] == [guide] * 3
    assert {s.generation.autoguide_scale for s in guided} == {2.0}
    assert unguided[0].generation.autoguide_model is None and unguided[0].generation.autoguide_scale is None
    for g, u in zip(guided, unguided, strict=True):
        assert not np.array_equal(np.asarray(Image.open(g.filepath)), np.asarray(Image.open(u.filepath)))
        assert np.array_equal(regenerate_ddpm_sample(g), np.asarray(Image.open(g.filepath)))
        assert np.array_equal(regenerate_ddpm_sample(u), np.asarray(Image.open(u.filepath)))


def test_cli_and_operator_take_the_guide(guided_ddpm, dataset_name):
    import fiftyone as fo
    from fiftyone.operators import execute_operator

    model, guide = guided_ddpm
    execute_operator("@fiftyone-diffusion/diffusion/generate_ddpm_samples",
                     params={"dataset": dataset_name, "num_samples": 2, "model": model, "steps": 2,
                             "autoguide_model": guide, "autoguide_scale": 1.5, "trajectory_steps": 0})
    proc = subprocess.run([CLI, "generate-ddpm-samples", "--dataset", dataset_name, "--num-samples", "2",
                           "--model", model, "--steps", "2", "--seed", "100", "--autoguide-model", "none",
                           "--trajectory-steps", "0"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    ds = fo.load_dataset(dataset_name)
    recipes = sorted((s.generation.seed, s.generation.autoguide_model, s.generation.autoguide_scale) for s in ds)
    assert recipes == [(0, guide, 1.5), (1, guide, 1.5), (100, None, None), (101, None, None)]


def test_the_shipped_model_is_autoguided_by_the_shipped_guide():
    from fiftyone_diffusion.brain.generation import resolve_autoguide
    from fiftyone_diffusion.plugins.ddpm import SHIPPED_GUIDE, load_ddpm

    model = load_ddpm(None)
    guide, scale = resolve_autoguide(model, "auto", None, True, "cpu")
    assert guide.name == SHIPPED_GUIDE and scale == model.extra["autoguidance"]["scale"] > 1.0
    assert guide.unet.config.block_out_channels == model.unet.config.block_out_channels
    # the guide is an earlier stage of the same model, not a copy of it
    assert guide.extra["total_steps"] < model.extra["total_steps"]
