"""The package's FiftyOne model-zoo manifest: CLIP models loadable by *name* in any process and in the App.

`register_zoo_manifest()` runs when `fiftyone_diffusion` is imported and when the plugin loads:
it appends `plugins/configs/zoo-manifest.json` to FIFTYONE_MODEL_ZOO_MANIFEST_PATHS (inherited by child
processes) and to `fo.config.model_zoo_manifest_paths` when FiftyOne is already imported.
"""

from __future__ import annotations

import os
import sys

MANIFEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "zoo-manifest.json")
ENV_VAR = "FIFTYONE_MODEL_ZOO_MANIFEST_PATHS"
GENERIC_OPEN_CLIP = "fiftyone-diffusion-open-clip"
GENERIC_TRANSFORMERS = "fiftyone-diffusion-transformers-clip"


def register_zoo_manifest() -> str:
    """Idempotently register the manifest (cheap: imports nothing when FiftyOne is not loaded yet)."""
    paths = [p for p in os.environ.get(ENV_VAR, "").split(":") if p]
    if MANIFEST not in paths:
        os.environ[ENV_VAR] = ":".join([*paths, MANIFEST])
    fo = sys.modules.get("fiftyone")
    config = getattr(fo, "config", None) if fo is not None else None
    if config is not None:
        current = list(config.model_zoo_manifest_paths or [])
        if MANIFEST not in current:
            config.model_zoo_manifest_paths = [*current, MANIFEST]
    return MANIFEST


def load_from_zoo(name: str, **kwargs):
    """`foz.load_zoo_model(name, **kwargs)` after making sure the manifest is registered."""
    import fiftyone.zoo as foz

    register_zoo_manifest()
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return foz.load_zoo_model(name, **kwargs)
