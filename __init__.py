"""fiftyone-diffusion: diffusion models and CLIP for dataset curation in FiftyOne.

This folder is both the Python package ``fiftyone_diffusion`` and a FiftyOne plugin.
FiftyOne executes this file under its own module name, so everything here imports
absolutely from ``fiftyone_diffusion`` and every class exists once.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

__version__ = "0.1.0"

# SDK function -> module that defines it. Loaded lazily so that `import fiftyone_diffusion`
# and the CLI's --help stay fast (FiftyOne and torch load on first use).
_SDK = {
    "load_mnist": "fiftyone_diffusion.brain.mnist",
    "train_classifier": "fiftyone_diffusion.brain.training",
    "train_ddpm": "fiftyone_diffusion.brain.training",
    "generate_ddpm_samples": "fiftyone_diffusion.brain.generation",
    "generate_sdxl_samples": "fiftyone_diffusion.brain.sdxl",
    "compute_forward_trajectory": "fiftyone_diffusion.brain.trajectory",
    "train_clip": "fiftyone_diffusion.brain.clip_training",
    "compute_clip_embeddings": "fiftyone_diffusion.brain.clip",
    "build_similarity_index": "fiftyone_diffusion.brain.clip",
    "search": "fiftyone_diffusion.brain.clip",
    "zero_shot_classify": "fiftyone_diffusion.brain.clip",
    "run_worker": "fiftyone_diffusion.worker",
}

__all__ = sorted(_SDK)


def _register_clip_zoo() -> None:
    """CLIP models by zoo name (similarity indexes store names, so text search works in any process)."""
    from fiftyone_diffusion.plugins.clip_zoo import register_zoo_manifest

    register_zoo_manifest()


if __name__ == "fiftyone_diffusion":
    _register_clip_zoo()


def __getattr__(name: str):
    if name in _SDK:
        return getattr(importlib.import_module(_SDK[name]), name)
    raise AttributeError(f"module 'fiftyone_diffusion' has no attribute {name!r}")


def _ensure_package_importable() -> None:
    """Make ``fiftyone_diffusion`` importable when only the plugin folder is present."""
    if "fiftyone_diffusion" in sys.modules or importlib.util.find_spec("fiftyone_diffusion"):
        return
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location(
        "fiftyone_diffusion", __file__, submodule_search_locations=[here]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["fiftyone_diffusion"] = module
    spec.loader.exec_module(module)


def register(p) -> None:
    """FiftyOne plugin entry point: registers every operator and panel."""
    _ensure_package_importable()
    _register_clip_zoo()
    from fiftyone_diffusion.operators import OPERATORS
    from fiftyone_diffusion.panels import PANELS

    for cls in OPERATORS + PANELS:
        p.register(cls)
