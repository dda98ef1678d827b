"""`fiftyone-diffusion plugin install`: link this package into FiftyOne's plugins dir."""

from __future__ import annotations

import os

PLUGIN_LINK_NAME = "fiftyone-diffusion"


def package_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def plugins_dir(override: str | None = None) -> str:
    if override:
        return os.path.abspath(os.path.expanduser(override))
    import fiftyone as fo

    return fo.config.plugins_dir or os.path.join(os.path.expanduser("~"), "fiftyone", "__plugins__")


def plugin_command(action: str, override_dir: str | None = None) -> dict:
    src = package_dir()
    if action == "path":
        return {"package_dir": src}
    folder = plugins_dir(override_dir)
    link = os.path.join(folder, PLUGIN_LINK_NAME)
    if action == "uninstall":
        if os.path.islink(link):
            os.remove(link)
        return {"removed": link}
    os.makedirs(folder, exist_ok=True)
    if os.path.islink(link) or os.path.exists(link):
        if os.path.islink(link) and os.path.realpath(link) == os.path.realpath(src):
            return {"plugin": link, "target": src, "status": "already installed"}
        if not os.path.islink(link):
            from fiftyone_diffusion.errors import InputError

            raise InputError(f"{link} exists and is not a link; remove it first")
        os.remove(link)
    os.symlink(src, link)
    hint = "" if os.environ.get("FIFTYONE_PLUGINS_DIR") else f" (FiftyOne reads plugins from {folder})"
    return {"plugin": link, "target": src, "status": "installed" + hint}
