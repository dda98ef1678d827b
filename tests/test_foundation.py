"""Package layout, private database, CLI and plugin registration."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [os.path.join(os.path.dirname(sys.executable), "fiftyone-diffusion")]
FIFTYONE = os.path.join(os.path.dirname(sys.executable), "fiftyone")


def test_fiftyone_uses_the_private_database(private_db):
    import fiftyone as fo
    import fiftyone.core.odm.database as fod

    assert fo.config.database_uri == private_db["uri"]
    client = fod.get_db_client()
    host, port = client.address
    assert (host, port) == ("127.0.0.1", private_db["port"])
    assert fo.config.plugins_dir == os.environ["FIFTYONE_PLUGINS_DIR"]


def test_package_is_importable_lazily():
    code = "import sys, fiftyone_diffusion as f; assert 'fiftyone' not in sys.modules; print(f.__all__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in ("load_mnist", "train_ddpm", "generate_ddpm_samples", "train_classifier"):
        assert name in out


def test_every_operator_has_an_sdk_function_and_a_cli_subcommand():
    import yaml

    import fiftyone_diffusion
    from fiftyone_diffusion.cli import build_parser
    from fiftyone_diffusion.operators import OPERATORS

    with open(os.path.join(ROOT, "fiftyone.yml")) as f:
        listed = yaml.safe_load(f)["operators"]
    names = [cls().config.name for cls in OPERATORS]
    assert sorted(names) == sorted(listed)
    subcommands = build_parser()._subparsers._group_actions[0].choices
    for name in names:
        assert callable(getattr(fiftyone_diffusion, name))
        assert name.replace("_", "-") in subcommands


def test_cli_help_lists_subcommands():
    out = subprocess.run(CLI + ["--help"], capture_output=True, text=True, check=True).stdout
    for sub in ("load-mnist", "train-ddpm", "train-classifier", "generate-ddpm-samples", "plugin", "demo"):
        assert sub in out


def test_plugin_is_discovered_and_lists_operators():
    out = subprocess.run([FIFTYONE, "operators", "list"], capture_output=True, text=True, check=True,
                         env=os.environ).stdout
    assert "@fiftyone-diffusion/diffusion/load_mnist" in out
    assert "@fiftyone-diffusion/diffusion/generate_ddpm_samples" in out


def test_plugin_install_links_the_package(tmp_path):
    out = subprocess.run(CLI + ["plugin", "install", "--plugins-dir", str(tmp_path)], capture_output=True,
                         text=True, check=True).stdout
    link = tmp_path / "fiftyone-diffusion"
    assert link.is_symlink() and (link / "fiftyone.yml").is_file()
    assert "installed" in out
    env = dict(os.environ, FIFTYONE_PLUGINS_DIR=str(tmp_path))
    listed = subprocess.run([FIFTYONE, "plugins", "list"], capture_output=True, text=True, check=True, env=env)
    assert "@fiftyone-diffusion/diffusion" in listed.stdout


@pytest.mark.slow
def test_wheel_holds_the_package_and_not_the_tests(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), ROOT], check=True, capture_output=True)
    import zipfile

    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fiftyone_diffusion/__init__.py" in names
    assert "fiftyone_diffusion/fiftyone.yml" in names
    assert "fiftyone_diffusion/plugins/ddpm.py" in names
    assert not any(n.startswith(("fiftyone_diffusion/tests", "fiftyone_diffusion/benchmarks", "tests/")) for n in names)
