"""Media files: atomic writes, so a crash never leaves a half-written image."""

from __future__ import annotations

import os
import tempfile

from PIL import Image


def atomic_save_image(image: Image.Image, path: str) -> str:
    """Write `image` to `path` through a temporary file and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(path)}-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def check_writable_dir(folder: str) -> str:
    """Create `folder` if needed and check that files can be written there."""
    from fiftyone_diffusion.errors import InputError

    folder = os.path.abspath(os.path.expanduser(folder))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as e:
        raise InputError(f"media dir {folder} is not writable: {e.strerror or e}") from None
    return folder
