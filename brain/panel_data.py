"""What the App panels show, prepared from a sample or a view: frame URLs, plot traces, tables."""

from __future__ import annotations

import os
from collections import Counter
from urllib.parse import quote

import numpy as np
from PIL import Image

from fiftyone_diffusion.brain.media import atomic_save_image
from fiftyone_diffusion.brain.trajectory import FIELD, Schedule, model_schedule, noise_schedule
from fiftyone_diffusion.plugins.noise import snr_db

MIN_FRAME_SIDE = 112  # frames are written at least this large (nearest-neighbour), so 28 px digits stay crisp
PLOT_POINTS = 250


def media_url(path: str) -> str:
    """The App server's URL for a local file."""
    return f"/media?filepath={quote(path, safe='')}"


def frame_files(strip_path: str, rows: int, cols: int) -> list[list[str]]:
    """Cut a strip of rows x cols equal frames into PNG files once (redone when the strip is newer)."""
    stem = os.path.splitext(os.path.basename(strip_path))[0]
    folder = os.path.join(os.path.dirname(strip_path), "frames", stem)
    paths = [[os.path.join(folder, f"r{r}_c{c}.png") for c in range(cols)] for r in range(rows)]
    mtime = os.path.getmtime(strip_path)
    if all(os.path.isfile(p) and os.path.getmtime(p) >= mtime for row in paths for p in row):
        return paths
    with Image.open(strip_path) as im:
        strip = im.convert("L" if im.mode in ("L", "1", "I", "I;16") else "RGB")
    w, h = strip.width // cols, strip.height // rows
    scale = max(1, -(-MIN_FRAME_SIDE // max(1, min(w, h))))
    for r in range(rows):
        for c in range(cols):
            frame = strip.crop((c * w, r * h, (c + 1) * w, (r + 1) * h))
            if scale > 1:
                frame = frame.resize((w * scale, h * scale), Image.NEAREST)
            atomic_save_image(frame, paths[r][c])
    return paths


def _get(doc, key, default=None):
    value = getattr(doc, key, None) if not isinstance(doc, dict) else doc.get(key)
    return default if value is None else value


def _field(sample, name):
    return sample[name] if sample.has_field(name) else None


def _stride(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    step = max(1, len(values) // PLOT_POINTS)
    idx = np.unique(np.r_[np.arange(0, len(values), step), len(values) - 1])
    return idx, values[idx]


def schedule_traces(schedule: Schedule, marked: list[int]) -> list[dict]:
    """Plotly traces: beta_t, alpha-bar_t and SNR (dB) over t on three stacked axes, marked timesteps."""
    betas = schedule.betas.double().numpy()
    abar = schedule.alphas_cumprod.double().numpy()
    snr = snr_db(schedule.alphas_cumprod).double().numpy()
    traces = []
    for values, axis, name in ((betas, "y", "β_t"), (abar, "y2", "ᾱ_t"), (snr, "y3", "SNR (dB)")):
        idx, ys = _stride(values)
        traces.append({"type": "scatter", "mode": "lines", "name": name, "x": idx.tolist(),
                       "y": [round(float(v), 6) for v in ys], "xaxis": "x", "yaxis": axis})
        ts = [t for t in marked if 0 <= t < len(values)]
        if ts:
            traces.append({"type": "scatter", "mode": "markers", "name": f"{name} (selected)", "x": ts,
                           "y": [round(float(values[t]), 6) for t in ts], "xaxis": "x", "yaxis": axis,
                           "marker": {"size": 10, "color": "#ff6d04"}})
    return traces


SCHEDULE_LAYOUT = {
    "height": 380, "width": 440, "showlegend": False, "margin": {"l": 60, "r": 20, "t": 30, "b": 40},
    "title": {"text": "Noise schedule"},
    "xaxis": {"title": {"text": "timestep t"}, "anchor": "y3"},
    "yaxis": {"domain": [0.70, 1.0], "title": {"text": "β_t"}},
    "yaxis2": {"domain": [0.36, 0.64], "title": {"text": "ᾱ_t"}},
    "yaxis3": {"domain": [0.0, 0.30], "title": {"text": "SNR (dB)"}},
}

STATS_LAYOUT = {
    "height": 380, "width": 400, "margin": {"l": 50, "r": 10, "t": 30, "b": 40},
    "title": {"text": "Recorded at generation"}, "xaxis": {"title": {"text": "sampling step"}},
    "legend": {"orientation": "h"},
}


def _stats_traces(trajectory, selected_step: int | None) -> list[dict]:
    pixel_std, eps_norm = list(_get(trajectory, "pixel_std", [])), list(_get(trajectory, "eps_norm", []))
    steps = list(range(1, max(len(pixel_std), len(eps_norm)) + 1))
    traces = [
        {"type": "scatter", "mode": "lines+markers", "name": "pixel std of x_t", "x": steps[: len(pixel_std)],
         "y": pixel_std},
        {"type": "scatter", "mode": "lines+markers", "name": "predicted-noise RMS", "x": steps[: len(eps_norm)],
         "y": eps_norm},
    ]
    if selected_step is not None and selected_step < len(steps):
        ys = [v[selected_step] for v in (pixel_std, eps_norm) if selected_step < len(v)]
        traces.append({"type": "scatter", "mode": "markers", "name": "selected step",
                       "x": [selected_step + 1] * len(ys), "y": ys, "marker": {"size": 12, "color": "#ff6d04"}})
    return traces


def noise_trajectory_data(sample, step: int | None = None, field: str = FIELD) -> dict:
    """Everything the noise_trajectory panel shows for one sample; `step` indexes the recorded frames."""
    out: dict = {"sample_id": sample.id, "forward": None, "reverse": None, "stats_plot": None}
    notes = []
    forward = _field(sample, field)
    fwd_path = _get(forward, "frames_path") if forward is not None else None
    if fwd_path and os.path.isfile(fwd_path):
        n = int(_get(forward, "num_frames", 1))
        paths = frame_files(fwd_path, 1, n)[0]
        levels = list(_get(forward, "noise_levels", []))
        out["forward"] = {
            "frames": [media_url(p) for p in paths], "levels": levels,
            "timesteps": list(_get(forward, "timesteps", [])), "space": _get(forward, "space", "pixel"),
            "caption": "Forward noising q(x_t | x_0) at levels " + ", ".join(f"{v:g}" for v in levels)
                       + f" of T ({_get(forward, 'space', 'pixel')} space)",
        }
    else:
        notes.append("This sample has no forward trajectory yet: press **Compute forward trajectory**.")

    trajectory = _field(sample, "trajectory")
    rev_path = _get(trajectory, "frames_path") if trajectory is not None else None
    generation = _field(sample, "generation")
    if rev_path and os.path.isfile(rev_path):
        n = int(_get(trajectory, "num_frames", 0)) or 1
        k = n - 1 if step is None else min(max(int(step), 0), n - 1)
        rows = frame_files(rev_path, 2, n)
        timesteps = list(_get(trajectory, "timesteps", []))
        step_indices = list(_get(trajectory, "step_indices", []))
        out["reverse"] = {
            "num_frames": n, "step": k, "xt": media_url(rows[0][k]), "x0": media_url(rows[1][k]),
            "strip": media_url(rev_path), "timesteps": timesteps, "step_indices": step_indices,
            "caption": f"Reverse step {step_indices[k] + 1 if k < len(step_indices) else k + 1} of "
                       f"{len(_get(trajectory, 'all_timesteps', [])) or n}, t = "
                       f"{timesteps[k] if k < len(timesteps) else '?'}: x_t (left), predicted x_0 (right)",
        }
        selected = step_indices[k] if k < len(step_indices) else None
        out["stats_plot"] = _stats_traces(trajectory, selected)
        schedule = sample_schedule(sample)
        marked = [timesteps[k]] if k < len(timesteps) else []
    elif trajectory is not None:
        notes.append("The recorded reverse trajectory's frames file is missing.")
        schedule, marked = noise_schedule("linear"), []
    else:
        if generation is None:
            notes.append("Not a generated sample: no reverse trajectory.")
        schedule = noise_schedule(_get(forward, "schedule", "linear")) if forward is not None else noise_schedule()
        marked = [t for t in (out["forward"] or {}).get("timesteps", []) if t >= 0]
    out["schedule_plot"] = schedule_traces(schedule, marked)
    out["message"] = " ".join(notes)
    return out


def _has(view, path: str) -> bool:
    try:
        return view.get_field(path) is not None
    except Exception:
        return False


def sample_schedule(sample) -> Schedule:
    """The noise schedule of the model that generated `sample`; the shipped DDPM's for other samples."""
    generation = _field(sample, "generation")
    return model_schedule(_get(generation, "model") if generation is not None else None)


def generation_overview_data(view, label_field: str = "prediction") -> dict:
    """Counts per predicted label, the confidence histogram and the table of generation recipes."""
    out = {"labels": None, "confidence": None, "recipes": [], "total": len(view)}
    if len(view) and _has(view, f"{label_field}.label"):
        counts = view.count_values(f"{label_field}.label")
        keys = sorted((k for k in counts if k is not None), key=lambda k: (not str(k).isdigit(), str(k).zfill(8)))
        if keys:
            out["labels"] = {"x": keys, "y": [counts[k] for k in keys]}
        if _has(view, f"{label_field}.confidence"):
            values = [v for v in view.values(f"{label_field}.confidence") if v is not None]
            hist, edges = np.histogram(values, bins=20, range=(0.0, 1.0))  # 1.0 falls in the last bin
            edges = [float(e) for e in edges]
            if values:
                out["confidence"] = {"x": [round((a + b) / 2, 4) for a, b in zip(edges[:-1], edges[1:], strict=True)],
                                     "y": [int(v) for v in hist], "width": round(edges[1] - edges[0], 4)}
    if len(view) and _has(view, "generation"):
        # one read of the recipe documents (autoguide_scale is not always declared in the dataset's schema)
        keys = ("model", "sampler", "steps", "guidance_scale", "autoguide_scale")
        rows = Counter(tuple(getattr(g, k, None) for k in keys) for g in view.values("generation") if g is not None)
        for (model, sampler, steps, guidance, autoguide), count in sorted(rows.items(), key=lambda kv: -kv[1]):
            if model is None:
                continue
            shown = "-" if guidance is None else guidance
            if autoguide is not None:
                shown = f"autoguidance {autoguide:g}"
            out["recipes"].append({"model": os.path.basename(str(model).rstrip("/")) or str(model),
                                   "sampler": sampler, "steps": steps, "guidance": shown, "count": count})
    return out

