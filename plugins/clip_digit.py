"""digit-CLIP: a small CLIP in open_clip format for handwritten digits, and its caption templates."""

from __future__ import annotations

import functools
import json
import os

from fiftyone_diffusion.plugins.classifier import WEIGHTS_DIR

DIGIT_CLIP = "digit-clip"
DIGIT_CLIP_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "digit-clip.json")
SHIPPED_DIGIT_CLIP = os.path.join(WEIGHTS_DIR, "digit-clip")
# MNIST statistics, replicated over the three channels open_clip feeds the image tower
PREPROCESS = {"size": 28, "mean": [0.1307] * 3, "std": [0.3081] * 3, "interpolation": "bilinear",
              "resize_mode": "shortest"}

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# `{d}` is the digit ("7"), `{w}` its word ("seven")
DIGIT_TEMPLATES = [
    "a handwritten {d}", "a handwritten {w}", "the digit {d}", "the digit {w}", "a photo of the number {d}",
    "a photo of the number {w}", "the number {w}", "a handwritten digit {d}", "an image of a {w}",
    "a drawing of the digit {d}", "{d}", "{w}",
]
GENERIC_TEMPLATES = ["a photo of a {c}", "a {c}", "an image of a {c}", "a picture of the {c}", "{c}"]
# the single template of the "single-template" zero-shot accuracy in the model card
SINGLE_TEMPLATE = "a photo of the number {d}"


def captions(label: str, templates: list[str] | None = None) -> list[str]:
    """Training / zero-shot captions of one class: digit templates for "0".."9", generic ones otherwise."""
    if label.isdigit() and len(label) == 1:
        return [t.format(d=label, w=DIGIT_WORDS[int(label)], c=label) for t in templates or DIGIT_TEMPLATES]
    return [t.format(c=label, d=label, w=label) for t in templates or GENERIC_TEMPLATES]


@functools.cache
def register_open_clip_config() -> str:
    """Make `open_clip.create_model("digit-clip")` work (the architecture; weights come separately)."""
    import open_clip

    if DIGIT_CLIP not in open_clip.list_models():
        open_clip.add_model_config(DIGIT_CLIP_CONFIG)
    return DIGIT_CLIP


def digit_clip_config() -> dict:
    with open(DIGIT_CLIP_CONFIG) as f:
        return json.load(f)
