"""SDXL generation into datasets: SDK, operator and CLI on a tiny SDXL pipeline saved to a folder."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fiftyone_diffusion.errors import InputError

CLI = os.path.join(os.path.dirname(sys.executable), "fiftyone-diffusion")
FAST = dict(steps=2, width=64, height=64, trajectory_steps=2, progress=False)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> str:
    from fiftyone_diffusion.plugins.sdxl_tiny import build_sdxl_pipeline

    folder = str(tmp_path_factory.mktemp("tiny-sdxl"))
    build_sdxl_pipeline(folder)
    return folder


class FakeClip:
    """The CLIP hook's interface (FiftyOne's embed_all / embed_prompts): mean colours, colour words."""

    def embed_all(self, images):
        return np.stack([np.asarray(im, dtype=np.float32).mean((0, 1)) + 1.0 for im in images])

    def embed_prompts(self, prompts):
        table = {"red": [1.0, 0.0, 0.0], "green": [0.0, 1.0, 0.0], "blue": [0.0, 0.0, 1.0]}
        return np.array([next((v for k, v in table.items() if k in p), [1.0, 1.0, 1.0]) for p in prompts])


def _png(path: str) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_sdk_stores_recipe_trajectory_clip_fields_and_regenerates(tiny_sdxl, dataset_name, tmp_path):
    import fiftyone as fo

    from fiftyone_diffusion import generate_sdxl_samples
    from fiftyone_diffusion.brain.sdxl import regenerate_sdxl_sample

    result = generate_sdxl_samples(dataset_name, ["a red fox", "a blue car"], negative_prompt="blurry",
                                   images_per_prompt=2, seed=40, batch_size=3, model=tiny_sdxl, steps=3,
                                   width=64, height=72, trajectory_steps=2, classes=["red", "green", "blue"],
                                   clip=FakeClip(), media_dir=str(tmp_path / "media"), progress=False)
    ds = fo.load_dataset(dataset_name)
    assert result["created"] == 4 and len(ds) == 4 and result["precision"] == "fp32"
    samples = list(ds.sort_by("generation.seed"))
    assert [(s.generation.prompt, s.generation.seed) for s in samples] == [
        ("a red fox", 40), ("a red fox", 41), ("a blue car", 42), ("a blue car", 43)]
    for s in samples:
        g = s.generation
        assert (g.model, g.negative_prompt, g.steps, g.guidance_scale, g.width, g.height, g.scheduler) == (
            tiny_sdxl, "blurry", 3, 5.0, 64, 72, "euler")
        assert g.created_at is not None and {"generated", "sdxl"} <= set(s.tags)
        assert _png(s.filepath).shape == (72, 64, 3)
        tr = s.trajectory
        assert tr.num_frames == 2 and tr.step_indices == [0, 2] and len(tr.timesteps) == 2
        assert len(tr.all_timesteps) == 3 and len(tr.latent_std) == 3
        assert _png(tr.frames_path).shape == (2 * 9, 2 * 8, 3)  # x_t and x_0 rows of 9x8 latent previews
        assert isinstance(s.prediction, fo.Classification) and s.prediction.label in {"red", "green", "blue"}
        mean = _png(s.filepath).reshape(-1, 3).mean(0) + 1.0
        assert s.prediction.label == ["red", "green", "blue"][int(mean.argmax())] and len(s.prediction.logits) == 3
        channel = 0 if "red" in g.prompt else 2
        assert s.clip_score == pytest.approx(mean[channel] / np.linalg.norm(mean), abs=1e-4)
    # batches were [40, 41, 42] and [43]: 42 regenerates from its recipe, 43 alone
    assert samples[2].generation.batch_seeds == [40, 41, 42]
    again = regenerate_sdxl_sample(samples[2])
    assert np.array_equal(again, _png(samples[2].filepath))
    alone = regenerate_sdxl_sample(samples[3], alone=True)  # it was alone in its batch
    assert np.array_equal(alone, _png(samples[3].filepath))
    nearly = regenerate_sdxl_sample(samples[1], alone=True)
    assert np.abs(nearly.astype(int) - _png(samples[1].filepath)).max() <= 1
    assert not np.array_equal(_png(samples[0].filepath), _png(samples[1].filepath))  # same prompt, other seed


@pytest.mark.parametrize("name, cls", [("euler", "EulerDiscreteScheduler"),
                                       ("euler_ancestral", "EulerAncestralDiscreteScheduler"),
                                       ("dpm++_2m", "DPMSolverMultistepScheduler"),
                                       ("dpm++_2m_karras", "DPMSolverMultistepScheduler"),
                                       ("ddim", "DDIMScheduler")])
def test_schedulers_by_name_from_the_pipeline_config(tiny_sdxl, name, cls):
    from fiftyone_diffusion.plugins.sdxl import generate, load_sdxl, make_scheduler

    model = load_sdxl(tiny_sdxl, "cpu")
    sched = make_scheduler(name, model.scheduler_config)
    assert type(sched).__name__ == cls
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.timestep_spacing == "leading"
    if name.startswith("dpm"):
        assert sched.config.algorithm_type == "dpmsolver++"
        assert sched.config.use_karras_sigmas is name.endswith("karras")
    a = generate(model, ["a cat"], [7], steps=3, width=64, height=64, scheduler=name)
    b = generate(model, ["a cat"], [7], steps=3, width=64, height=64, scheduler=name)
    assert np.array_equal(a, b)  # euler_ancestral's per-step noise comes from the sample's generator too
    if name != "euler":
        assert not np.array_equal(a, generate(model, ["a cat"], [7], steps=3, width=64, height=64))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[]), "prompts"),
        (dict(prompts=["a cat", "  "]), "prompts"),
        (dict(width=60), "width must be a multiple of 8"),
        (dict(height=2056), "height must be a multiple of 8"),
        (dict(width=56), "width"),
        (dict(steps=0), "steps"),
        (dict(guidance_scale=-0.5), "guidance_scale"),
        (dict(scheduler="plms"), "unknown scheduler"),
        (dict(model="/nonexistent/sdxl"), "does not exist"),
        (dict(images_per_prompt=0), "images_per_prompt"),
        (dict(classes=["cat"]), "no CLIP model"),
        (dict(media_dir="/proc/forbidden"), "not writable"),
    ],
)
def test_bad_input_fails_before_anything_is_written(tiny_sdxl, dataset_name, tmp_path, kwargs, message):
    import fiftyone as fo

    from fiftyone_diffusion import generate_sdxl_samples

    args = dict(prompts=["a cat"], model=tiny_sdxl, media_dir=str(tmp_path / "media"), **FAST)
    args.update(kwargs)
    with pytest.raises(InputError, match=message):
        generate_sdxl_samples(dataset_name, **args)
    assert not fo.dataset_exists(dataset_name)
    assert not (tmp_path / "media").exists()


def test_a_folder_that_is_not_sdxl_is_rejected(tmp_path, dataset_name):
    from fiftyone_diffusion import generate_sdxl_samples

    (tmp_path / "notsdxl").mkdir()
    with pytest.raises(InputError, match="not a diffusers SDXL pipeline"):
        generate_sdxl_samples(dataset_name, ["a cat"], model=str(tmp_path / "notsdxl"), **FAST)


@pytest.mark.parametrize("hub_id", [None, "stabilityai/sdxl-turbo"])
def test_a_hub_id_not_in_the_offline_cache_gives_one_clear_error(hub_id, dataset_name, monkeypatch, tmp_path):
    import fiftyone as fo

    from fiftyone_diffusion import generate_sdxl_samples

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(InputError) as err:
        generate_sdxl_samples(dataset_name, ["a cat"], model=hub_id, **FAST)
    message = str(err.value)
    assert repr(hub_id or "stabilityai/stable-diffusion-xl-base-1.0") in message
    assert "huggingface-cli download" in message and "local copy" in message and "HF_HOME" in message
    assert "\n" not in message and not fo.dataset_exists(dataset_name)


def test_failure_half_way_keeps_written_samples_and_no_orphans(tiny_sdxl, dataset_name, tmp_path, monkeypatch):
    import fiftyone as fo

    from fiftyone_diffusion import generate_sdxl_samples
    from fiftyone_diffusion.brain import sdxl

    calls = {"n": 0}
    real = sdxl.atomic_save_image

    def flaky(image, path):
        calls["n"] += 1
        if calls["n"] == 7:  # image + trajectory per sample: the 4th image, 2nd of the 2nd batch
            raise OSError("disk full")
        return real(image, path)

    monkeypatch.setattr(sdxl, "atomic_save_image", flaky)
    media = tmp_path / "media"
    with pytest.raises(sdxl.GenerationFailed, match=r"failed at images 3\.\.4 of 6 \(OSError: disk full\)") as err:
        generate_sdxl_samples(dataset_name, ["a", "b", "c"], images_per_prompt=2, batch_size=2, model=tiny_sdxl,
                              media_dir=str(media), **FAST)
    ds = fo.load_dataset(dataset_name)
    assert len(ds) == 2
    on_disk = {str(p) for p in media.rglob("*.png")}
    assert on_disk == set(ds.values("filepath")) | set(ds.values("trajectory.frames_path"))
    assert not list(media.rglob(".tmp-*"))
    assert err.value.result["created"] == 2 and err.value.result["failed"] == "images 3..4 of 6"
    assert "2 images were added" in str(err.value) and isinstance(err.value.__cause__, OSError)


def test_failure_inside_the_pipeline_at_image_k(tiny_sdxl, dataset_name, tmp_path, monkeypatch):
    import fiftyone as fo

    from fiftyone_diffusion import generate_sdxl_samples
    from fiftyone_diffusion.brain import sdxl

    real, calls = sdxl.generate, {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("CUDA out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(sdxl, "generate", failing)
    with pytest.raises(sdxl.GenerationFailed, match="images 3..3 of 4 .RuntimeError: CUDA out of memory"):
        generate_sdxl_samples(dataset_name, ["a", "b"], images_per_prompt=2, model=tiny_sdxl,
                              media_dir=str(tmp_path / "m"), **FAST)
    ds = fo.load_dataset(dataset_name)
    assert sorted(ds.values("generation.seed")) == [0, 1]
    assert len(list((tmp_path / "m").rglob("*.png"))) == 4  # two images, two trajectory strips


def test_pipeline_is_cached_per_model_dtype_device(tiny_sdxl, dataset_name, monkeypatch):
    import diffusers

    from fiftyone_diffusion import generate_sdxl_samples
    from fiftyone_diffusion.plugins.sdxl import load_sdxl

    first = load_sdxl(tiny_sdxl, "cpu")
    assert load_sdxl(tiny_sdxl, "cpu", "fp32") is first and load_sdxl(tiny_sdxl + "/", "cpu") is first

    def no_reload(*args, **kwargs):
        raise AssertionError("the pipeline was loaded again")

    monkeypatch.setattr(diffusers.StableDiffusionXLPipeline, "from_pretrained", no_reload)
    generate_sdxl_samples(dataset_name, ["a cat"], model=tiny_sdxl, device="cpu", **FAST)
    with pytest.raises(InputError, match="loaded again"):
        load_sdxl(tiny_sdxl, "cpu", "bf16")  # another dtype is another pipeline


def test_vae_trajectory_previews_and_offload_flags(tiny_sdxl, dataset_name):
    import fiftyone as fo

    from fiftyone_diffusion import generate_sdxl_samples

    generate_sdxl_samples(dataset_name, ["a cat"], model=tiny_sdxl, trajectory_preview="vae", vae_slicing=True,
                          vae_tiling=True, cpu_offload=True, device="cpu", scheduler="dpm++_2m", **FAST)
    tr = fo.load_dataset(dataset_name).first().trajectory
    assert tr.preview == "vae" and _png(tr.frames_path).shape == (2 * 16, 2 * 16, 3)


def test_refiner_finishes_the_schedule_and_the_recipe_regenerates(tiny_sdxl, dataset_name):
    import fiftyone as fo

    from fiftyone_diffusion import generate_sdxl_samples
    from fiftyone_diffusion.brain.sdxl import regenerate_sdxl_sample

    args = dict(model=tiny_sdxl, steps=4, width=64, height=64, trajectory_steps=4, progress=False)
    generate_sdxl_samples(dataset_name, ["a cat"], refiner=tiny_sdxl, refiner_start=0.5, **args)
    s = fo.load_dataset(dataset_name).first()
    assert s.generation.refiner == tiny_sdxl and s.generation.refiner_start == 0.5
    assert len(s.trajectory.all_timesteps) == 4 and s.trajectory.num_frames == 4  # 2 base + 2 refiner steps
    assert np.array_equal(regenerate_sdxl_sample(s), _png(s.filepath))
    base = generate_sdxl_samples(dataset_name, ["a cat"], **args)
    assert base["refiner"] is None
    only_base = fo.load_dataset(dataset_name).match({"generation.refiner": None}).first()
    # the "refiner" here has the base's weights: handing over half way must not change a pixel
    assert np.array_equal(_png(only_base.filepath), _png(s.filepath))
    with pytest.raises(InputError, match="refiner_start"):
        generate_sdxl_samples(dataset_name, ["a cat"], refiner=tiny_sdxl, refiner_start=1.0, **args)


def test_operator_and_cli_generate_into_a_dataset(tiny_sdxl, dataset_name, tmp_path, capsys):
    import fiftyone as fo
    from fiftyone.operators import execute_operator

    from fiftyone_diffusion.brain.sdxl import regenerate_sdxl_sample

    execute_operator("@fiftyone-diffusion/diffusion/generate_sdxl_samples",
                     params={"dataset": dataset_name, "prompts": "a cat\n\na dog\n", "model": tiny_sdxl, "steps": 2,
                             "width": 64, "height": 64, "seed": 5, "scheduler": "euler_ancestral",
                             "trajectory_steps": 1, "device": "cpu"})
    ds = fo.load_dataset(dataset_name)
    assert sorted(ds.values("generation.prompt")) == ["a cat", "a dog"]
    first = ds.match({"generation.seed": 6}).first()
    assert first.generation.prompt == "a dog" and first.generation.scheduler == "euler_ancestral"
    assert np.array_equal(regenerate_sdxl_sample(first, device="cpu"), _png(first.filepath))

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red house\n# a comment\n\na green tree\n")
    proc = subprocess.run([CLI, "generate-sdxl-samples", "a boat", "--prompts-file", str(prompts), "--dataset",
                           dataset_name, "--model", tiny_sdxl, "--steps", "2", "--width", "64", "--height", "64",
                           "--seed", "100", "--scheduler", "ddim", "--trajectory-steps", "0"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert '"created": 3' in proc.stdout
    cli = ds.match({"generation.seed": {"$gte": 100}})
    assert sorted(cli.values("generation.prompt")) == ["a boat", "a green tree", "a red house"]
    from fiftyone_diffusion.cli import main

    code = main(["generate-sdxl-samples", "a cat", "--dataset", dataset_name, "--model", tiny_sdxl, "--width", "100"])
    assert code == 2 and capsys.readouterr().err.strip().startswith("error: width must be a multiple of 8")
    assert len(fo.load_dataset(dataset_name)) == 5
