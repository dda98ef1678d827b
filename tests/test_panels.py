"""Panel logic without the App: panel methods driven through FiftyOne's operator execution."""

from __future__ import annotations

import os
from urllib.parse import unquote

import numpy as np
from PIL import Image

PLUGIN = "@fiftyone-diffusion/diffusion"


def run_panel(panel: str, dataset, method: str = "on_load", current_sample=None, state=None, **params) -> dict:
    """Run one panel method; return the state and data it patched and the other operations it triggered."""
    from fiftyone.operators import execute_operator

    state = dict(state or {})
    result = execute_operator(
        f"{PLUGIN}/{panel}", dataset=dataset, current_sample=current_sample,
        params={"panel_id": "p1", "__method__": method, "state": state, "panel_state": state, **params},
    )
    assert result.error is None, result.error_message
    out = {"state": state, "data": {}, "ops": [], "rendered": None}
    for req in result.executor.to_json()["requests"]:
        name, p = req["operator_uri"].split("/")[-1], req["params"]
        if name == "patch_panel_state":
            out["state"].update(p["state"])
        elif name == "patch_panel_data":
            out["data"].update(p["data"])
        elif name == "show_panel_output":
            out["rendered"] = p["output"]
        else:
            out["ops"].append((name, p))
    assert out["rendered"] is not None  # render() ran without error
    return out


def _path(url: str) -> str:
    assert url.startswith("/media?filepath=")
    return unquote(url.split("=", 1)[1])


def _plot_names(traces) -> set:
    return {t["name"] for t in traces}


def test_noise_trajectory_on_an_empty_dataset(dataset_name):
    import fiftyone as fo

    ds = fo.Dataset(dataset_name)
    out = run_panel("noise_trajectory", ds)
    assert out["state"]["has_sample"] is False and "empty" in out["state"]["message"]
    assert out["data"]["plots"]["schedule_plot"] == []
    overview = run_panel("generation_overview", ds)
    assert overview["state"]["has_labels"] is False and overview["state"]["message"] == "The view is empty."


def test_noise_trajectory_grayscale_sample_without_trajectory_then_computed(tmp_path, mnist_dir, dataset_name):
    from fiftyone_diffusion import load_mnist
    from fiftyone_diffusion.brain.trajectory import model_schedule

    ds = load_mnist(dataset_name, "test", max_samples=3, data_dir=mnist_dir, media_dir=str(tmp_path / "mnist"))
    sample = ds.skip(1).first()
    out = run_panel("noise_trajectory", ds, current_sample=sample.id)
    s = out["state"]
    assert s["sample_id"] == sample.id and s["has_forward"] is False and s["has_reverse"] is False
    assert "no forward trajectory" in s["message"] and "Not a generated sample" in s["message"]
    assert {"β_t", "ᾱ_t", "SNR (dB)"} <= _plot_names(out["data"]["plots"]["schedule_plot"])
    assert "Compute forward trajectory" in str(out["rendered"])

    out = run_panel("noise_trajectory", ds, method="compute_forward", current_sample=sample.id,
                    state={**s, "levels": "0, 0.5, 1"})
    s = out["state"]
    assert s["has_forward"] is True and s["num_forward"] == 3 and "no forward" not in s["message"]
    frames = [_path(s["forward_frames"][f"f{i}"]) for i in range(3)]
    first = np.asarray(Image.open(frames[0]))
    assert first.ndim == 2 and first.shape == (112, 112)  # grayscale frame, upscaled 4x
    assert np.array_equal(first[::4, ::4], np.asarray(Image.open(sample.filepath)))
    marks = [t for t in out["data"]["plots"]["schedule_plot"] if t["name"] == "ᾱ_t (selected)"]
    assert marks and marks[0]["x"] == [499, 999]
    ds.reload()
    assert ds[sample.id].forward_trajectory.noise_levels == [0.0, 0.5, 1.0]
    assert ds[sample.id].forward_trajectory.schedule == model_schedule(None).name  # the shipped DDPM's
    assert not ds.exists("forward_trajectory").exclude([sample.id]).count()  # only the current sample

    bad = run_panel("noise_trajectory", ds, method="compute_forward", current_sample=sample.id,
                    state={**s, "levels": "0, 7"})
    assert "Could not compute" in bad["state"]["message"]
    assert any(name == "notify" for name, _ in bad["ops"])

    # grid surface, no modal: the first sample of the view
    grid = run_panel("noise_trajectory", ds)
    assert grid["state"]["sample_id"] == ds.first().id


def test_noise_trajectory_rgb_sample(tmp_path, dataset_name):
    import fiftyone as fo

    from fiftyone_diffusion import compute_forward_trajectory

    path = str(tmp_path / "rgb.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    ds = fo.Dataset(dataset_name)
    ds.add_sample(fo.Sample(filepath=path))
    compute_forward_trajectory(ds, progress=False)
    out = run_panel("noise_trajectory", ds, current_sample=ds.first().id)
    s = out["state"]
    assert s["has_forward"] is True and s["num_forward"] == 6 and s["has_reverse"] is False
    frame = np.asarray(Image.open(_path(s["forward_frames"]["f0"])))
    assert frame.shape == (144, 192, 3)
    overview = run_panel("generation_overview", ds)
    assert overview["state"]["has_labels"] is False and "prediction" in overview["state"]["message"]


def test_panels_on_generated_samples(tiny_ddpm, dataset_name, tmp_path, mnist_dir):
    import fiftyone as fo
    from fiftyone import ViewField as F

    from fiftyone_diffusion import generate_ddpm_samples, train_ddpm

    generate_ddpm_samples(dataset_name, num_samples=4, model=tiny_ddpm, steps=4, trajectory_steps=3, progress=False)
    generate_ddpm_samples(dataset_name, num_samples=2, model=tiny_ddpm, sampler="ddim", steps=2, seed=50,
                          trajectory_steps=2, autoguide_model=tiny_ddpm, autoguide_scale=1.5, progress=False)
    ds = fo.load_dataset(dataset_name)
    sample = ds.first()
    out = run_panel("noise_trajectory", ds, current_sample=sample.id)
    s = out["state"]
    assert s["has_reverse"] is True and s["num_reverse"] == 3 and s["step"] == 2
    xt, x0 = (np.asarray(Image.open(_path(s["reverse_frames"][k]))) for k in ("xt", "x0"))
    assert xt.shape == x0.shape == (112, 112)
    assert _path(s["reverse_strip"]) == sample.trajectory.frames_path
    stats = out["data"]["plots"]["stats_plot"]
    assert {"pixel std of x_t", "predicted-noise RMS", "selected step"} <= _plot_names(stats)
    assert "no forward trajectory" in s["message"] and "Not a generated" not in s["message"]

    moved = run_panel("noise_trajectory", ds, method="on_change_step", current_sample=sample.id, state=s, value=0)
    assert moved["state"]["step"] == 0 and moved["state"]["reverse_frames"]["xt"] != s["reverse_frames"]["xt"]
    mark = [t for t in moved["data"]["plots"]["schedule_plot"] if t["name"] == "β_t (selected)"][0]
    assert mark["x"] == [sample.trajectory.timesteps[0]]
    stats_mark = [t for t in moved["data"]["plots"]["stats_plot"] if t["name"] == "selected step"][0]
    assert stats_mark["x"][0] == sample.trajectory.step_indices[0] + 1

    os.remove(sample.trajectory.frames_path)  # a missing frames file is a message, not an error
    gone = run_panel("noise_trajectory", ds, current_sample=sample.id)
    assert gone["state"]["has_reverse"] is False and "missing" in gone["state"]["message"]

    overview = run_panel("generation_overview", ds)
    st, data = overview["state"], overview["data"]
    labels = data["labels_plot"][0]
    assert sum(labels["y"]) == 6 and set(labels["x"]) == set(ds.distinct("prediction.label"))
    assert sum(data["confidence_plot"][0]["y"]) == 6
    recipes = {(r["sampler"], r["steps"], r["guidance"]): r["count"] for r in st["recipes"]}
    assert recipes == {("dpmsolver++", 4, "-"): 4, ("ddim", 2, "autoguidance 1.5"): 2}
    assert "6 of 6" in st["message"]

    label = labels["x"][0]
    clicked = run_panel("generation_overview", ds, method="on_label_click", state=st, x=label)
    (name, params), = [op for op in clicked["ops"] if op[0] == "set_view"]
    assert clicked["state"]["filtered_label"] == label
    view = fo.DatasetView._build(ds, params["view"])
    assert len(view) == labels["y"][0] and set(view.values("prediction.label")) == {label}
    reset = run_panel("generation_overview", ds, method="show_all", state=clicked["state"])
    assert any(op[0] == "clear_view" for op in reset["ops"]) and reset["state"]["filtered_label"] is None

    # computing a forward trajectory on a generated sample uses its model's schedule, not a fixed one
    linear = str(tmp_path / "linear-ddpm")
    train_ddpm(linear, data_dir=mnist_dir, steps=1, beta_schedule="linear", block_out_channels=(32, 32, 32),
               batch_size=2, checkpoint_every=1, progress=False)
    generate_ddpm_samples(dataset_name, num_samples=1, model=linear, steps=2, seed=90, progress=False)
    ds.reload()
    for model, expected in ((tiny_ddpm, "squaredcos_cap_v2"), (linear, "linear")):
        gen = ds.match(F("generation.model") == model).first()
        run_panel("noise_trajectory", ds, method="compute_forward", current_sample=gen.id, state={"levels": "0, 1"})
        ds.reload()
        assert ds[gen.id].forward_trajectory.schedule == expected
