"""`fiftyone-diffusion worker`: queued operations of this plugin run once each, and failed or
cancelled runs leave no half-written samples or orphan files and say what they completed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

CLI = os.path.join(os.path.dirname(sys.executable), "fiftyone-diffusion")
GENERATE = "@fiftyone-diffusion/diffusion/generate_ddpm_samples"
FAST = {"steps": 2, "sampler": "ddim"}
FAULTY_WORKER = """
import sys
from fiftyone_diffusion.brain import generation

real, calls = generation.atomic_save_image, {"n": 0}

def flaky(image, path):
    calls["n"] += 1
    if calls["n"] == 6:  # image + trajectory per sample: the 3rd sample, in the 2nd batch
        raise OSError("disk full")
    return real(image, path)

generation.atomic_save_image = flaky
from fiftyone_diffusion.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _queue(params: dict, dataset=None):
    from fiftyone.operators import execute_operator

    result = execute_operator(GENERATE, dataset=dataset, params=params, request_delegation=True)
    assert result.delegated and result.error is None, result.error
    return result.result["id"]


def _op(op_id):
    from fiftyone.operators.delegated import DelegatedOperationService

    return DelegatedOperationService().get(op_id)


def _summary(stdout: str) -> dict:
    return json.JSONDecoder().raw_decode(stdout[stdout.index("{\n"):])[0]


def _media(name: str) -> str:
    import fiftyone as fo

    return os.path.join(fo.config.default_dataset_dir, "fiftyone-diffusion", name)


def _assert_no_orphans(ds, folder: str) -> None:
    on_disk = {os.path.join(root, f) for root, _, files in os.walk(folder) for f in files}
    assert not [p for p in on_disk if os.path.basename(p).startswith(".tmp-")]
    assert on_disk == set(ds.values("filepath")) | set(ds.values("trajectory.frames_path"))
    assert all(s.generation is not None and os.path.exists(s.filepath) for s in ds)


class _Worker:
    """A worker subprocess whose output lines are collected as they come."""

    def __init__(self, *args: str, cwd=None, script: str | None = None):
        cmd = [sys.executable, "-c", script, "worker", *args] if script else [CLI, "worker", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while not any(text in line for line in list(self.lines)):
            assert self.proc.poll() is None, "".join(self.lines)
            assert time.time() < deadline, f"no {text!r} in:\n" + "".join(self.lines)
            time.sleep(0.1)

    def finish(self, timeout: float = 180) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self.reader.join(10)
        return rc, "".join(self.lines)


def _wait_progress(op_id, at_least: float, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        doc = _op(op_id)
        if doc.status is not None and (doc.status.progress or 0) >= at_least:
            return
        assert doc.run_state in ("queued", "running") and time.time() < deadline, (doc.run_state, doc.result)
        time.sleep(0.05)


def test_auto_device_follows_the_worker_setting(monkeypatch):
    import torch

    from fiftyone_diffusion.errors import InputError
    from fiftyone_diffusion.plugins.devices import DEVICE_ENV, resolve_device

    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    monkeypatch.setenv(DEVICE_ENV, "tpu9")
    with pytest.raises(InputError, match="unknown device 'tpu9'"):
        resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")  # an explicit device wins


@pytest.mark.slow
def test_worker_runs_a_queued_generation_and_records_result_and_progress(tiny_ddpm, dataset_name, tmp_path):
    import fiftyone as fo

    op_id = _queue({"dataset": dataset_name, "num_samples": 3, "model": tiny_ddpm, "batch_size": 2,
                    "trajectory_steps": 2, **FAST})
    assert _op(op_id).run_state == "queued"
    proc = subprocess.run([CLI, "worker", "--max-operations", "1", "--idle-exit", "60", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    head = proc.stdout.splitlines()[:3]
    assert head[0].startswith("database: mongodb://127.0.0.1:")
    assert head[1].startswith(f"plugins dir: {fo.config.plugins_dir} (@fiftyone-diffusion/diffusion at ")
    assert head[2] == "device: cpu"
    summary = _summary(proc.stdout)
    assert summary["completed"] == 1 and summary["failed"] == 0 and summary["stopped"] == "max-operations"
    doc = _op(op_id)
    assert doc.run_state == "completed"
    assert doc.result.result["created"] == 3 and doc.result.result["device"] == "cpu"
    assert doc.status.progress == 1.0 and doc.status.label == "generated 3/3"
    ds = fo.load_dataset(dataset_name)
    assert len(ds) == 3 and set(ds.values("generation.run_key")) == {doc.result.result["run_key"]}
    _assert_no_orphans(ds, _media(dataset_name))


@pytest.mark.slow
def test_two_workers_run_each_operation_exactly_once(tiny_ddpm, tmp_path):
    import fiftyone as fo

    names = [f"test-two-workers-{i}-{os.urandom(3).hex()}" for i in range(4)]
    workers = [_Worker("--idle-exit", "4", "--poll-interval", "0.1", "--device", "cpu", cwd=tmp_path)
               for _ in range(2)]
    try:
        for w in workers:
            w.wait_for("waiting for queued operations")
        ops = [_queue({"dataset": n, "num_samples": 2, "model": tiny_ddpm, "trajectory_steps": 0, "seed": 10 * i,
                       **FAST}) for i, n in enumerate(names)]
        summaries = []
        for w in workers:
            rc, out = w.finish()
            assert rc == 0, out
            summaries.append(_summary(out))
        ran = [r["id"] for s in summaries for r in s["operations"]]
        assert sorted(ran) == sorted(str(i) for i in ops)  # every operation ran, none twice
        assert sum(s["completed"] for s in summaries) == 4 and all(s["stopped"] == "idle" for s in summaries)
        for op_id, name in zip(ops, names, strict=True):
            doc = _op(op_id)
            assert doc.run_state == "completed" and doc.result.result["created"] == 2
            assert len(fo.load_dataset(name)) == 2  # not doubled
    finally:
        for name in names:
            if fo.dataset_exists(name):
                fo.delete_dataset(name)


@pytest.mark.slow
def test_failed_run_says_what_it_completed_and_resumes_without_orphans(tiny_ddpm, dataset_name, tmp_path):
    import fiftyone as fo

    params = {"dataset": dataset_name, "num_samples": 6, "model": tiny_ddpm, "batch_size": 2,
              "trajectory_steps": 2, **FAST}
    failing = _queue(params)
    w = _Worker("--max-operations", "1", "--device", "cpu", cwd=tmp_path, script=FAULTY_WORKER)
    rc, out = w.finish()
    assert rc == 0, out
    assert _summary(out)["failed"] == 1
    doc = _op(failing)
    assert doc.run_state == "failed"
    assert "OSError: disk full" in doc.result.error
    found = re.search(rf"2 of 6 samples of run_key '(\w+)' are in dataset '{dataset_name}'.*"
                      r"Resume with run_key='(\w+)'", doc.result.error)
    assert found and found[1] == found[2], doc.result.error
    ds = fo.load_dataset(dataset_name)
    assert len(ds) == 2 and set(ds.values("generation.run_key")) == {found[1]}
    _assert_no_orphans(ds, _media(dataset_name))

    resumed = _queue({**params, "run_key": found[1]})
    proc = subprocess.run([CLI, "worker", "--max-operations", "1", "--device", "cpu"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = _op(resumed).result.result
    assert result["created"] == 4 and result["resumed"] == 2
    ds.reload()
    assert sorted(ds.values("generation.index")) == list(range(6))
    _assert_no_orphans(ds, _media(dataset_name))


@pytest.mark.slow
def test_run_marked_failed_in_monitor_mode_stops_cleanly(tiny_ddpm, dataset_name, tmp_path):
    import fiftyone as fo
    from fiftyone.operators.delegated import DelegatedOperationService

    op_id = _queue({"dataset": dataset_name, "num_samples": 1000, "model": tiny_ddpm, "batch_size": 1,
                    "trajectory_steps": 2, **FAST})
    w = _Worker("--monitor", "--max-operations", "1", "--device", "cpu", cwd=tmp_path)
    _wait_progress(op_id, 0.01)
    DelegatedOperationService().set_failed(op_id)  # what `fiftyone delegated fail <id>` does
    rc, out = w.finish()
    assert rc == 0, out
    assert _summary(out)["failed"] == 1
    doc = _op(op_id)
    assert doc.run_state == "failed"
    ds = fo.load_dataset(dataset_name)
    assert 0 < len(ds) < 1000
    assert f"operation {op_id} was marked as failed" in doc.result.error
    assert f"{len(ds)} of 1000 samples of run_key" in doc.result.error, doc.result.error
    _assert_no_orphans(ds, _media(dataset_name))


@pytest.mark.slow
def test_sigterm_finishes_the_running_operation_and_a_second_one_cancels_it(tiny_ddpm, dataset_name, tmp_path):
    import fiftyone as fo

    op_id = _queue({"dataset": dataset_name, "num_samples": 1000, "model": tiny_ddpm, "batch_size": 1,
                    "trajectory_steps": 2, **FAST})
    w = _Worker("--device", "cpu", cwd=tmp_path)
    _wait_progress(op_id, 0.01)
    w.proc.send_signal(signal.SIGTERM)
    w.wait_for("stopping after the running operation")
    progress = _op(op_id).status.progress
    _wait_progress(op_id, progress + 0.01)  # still running
    w.proc.send_signal(signal.SIGTERM)
    rc, out = w.finish()
    assert rc == 0, out
    summary = _summary(out)
    assert summary["failed"] == 1 and summary["stopped"] == "signal"
    doc = _op(op_id)
    ds = fo.load_dataset(dataset_name)
    assert doc.run_state == "failed" and 0 < len(ds) < 1000
    assert "OperationCancelled: the worker was stopped" in doc.result.error
    assert f"{len(ds)} of 1000 samples of run_key" in doc.result.error, doc.result.error
    _assert_no_orphans(ds, _media(dataset_name))


def test_worker_without_the_plugin_says_how_to_install_it(tmp_path):
    env = {**os.environ, "FIFTYONE_PLUGINS_DIR": str(tmp_path / "empty-plugins")}
    proc = subprocess.run([CLI, "worker", "--idle-exit", "0"], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: the @fiftyone-diffusion/diffusion plugin is not in FiftyOne's plugins dir "
        f"{tmp_path / 'empty-plugins'}; run `fiftyone-diffusion plugin install`"
    ]


def test_scaling_docs_use_only_worker_options_that_exist():
    """docs/scaling.md and the README describe the worker with flags the CLI really has."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cli = os.path.join(os.path.dirname(sys.executable), "fiftyone-diffusion")
    help_text = subprocess.run([cli, "worker", "--help"], capture_output=True, text=True, check=True).stdout
    used = set()
    for doc in ("docs/scaling.md", "README.md"):
        with open(os.path.join(root, doc)) as f:
            text = f.read()
        for line in re.findall(r"fiftyone-diffusion worker[^\n`#&]*", text):
            used.update(re.findall(r"--[a-z][a-z-]+", line))
        used.update(re.findall(r"`(--[a-z][a-z-]+)", text) if doc == "docs/scaling.md" else [])
    assert {"--device", "--idle-exit", "--max-operations"} <= used
    missing = sorted(flag for flag in used if flag not in help_text)
    assert not missing, f"documented worker options the CLI lacks: {missing}"
