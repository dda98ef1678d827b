"""`fiftyone-diffusion worker`: run FiftyOne's queued (delegated) operations, one at a time.

A worker is FiftyOne's delegated-operation service (what `fiftyone delegated launch` runs) set up
for this plugin: the plugin must be in FiftyOne's plugins dir, the CLIP zoo manifest is registered
(importing `fiftyone_diffusion` does it) and `--device` says what `device=auto` means. Claiming an
operation is atomic in the database, so any number of workers can share one queue; for N GPUs run
`CUDA_VISIBLE_DEVICES=i fiftyone-diffusion worker` N times.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import traceback
from collections.abc import Callable

from fiftyone_diffusion.errors import InputError

PLUGIN = "@fiftyone-diffusion/diffusion"
_CANCEL = threading.Event()  # set by the worker: cancel the operation running in this process


class OperationCancelled(Exception):
    """Raised at a progress checkpoint of a delegated run that was marked failed or whose worker stops it."""


def check_plugin_installed() -> str:
    """The folder FiftyOne loads this plugin from; InputError if its operators are not available."""
    import fiftyone as fo
    import fiftyone.operators as foo
    import fiftyone.plugins as fop

    hint = "run `fiftyone-diffusion plugin install`"
    if not fo.config.plugins_dir:
        raise InputError(f"FiftyOne has no plugins dir (FIFTYONE_PLUGINS_DIR is unset); {hint}")
    found = [p for p in fop.list_plugins(enabled="all") if p.name == PLUGIN]
    if not found:
        raise InputError(f"the {PLUGIN} plugin is not in FiftyOne's plugins dir {fo.config.plugins_dir}; {hint}")
    if not any(op.uri.startswith(PLUGIN + "/") for op in foo.list_operators()):
        raise InputError(f"the {PLUGIN} plugin at {found[0].directory} loads no operators (disabled, or an "
                         "import error: see `fiftyone plugins list` and `fiftyone operators list`)")
    return found[0].directory


def _redact(uri: str | None) -> str:
    if not uri:
        import fiftyone as fo

        return f"FiftyOne's own MongoDB (database dir {fo.config.database_dir})"
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", uri)


class _ProgressChecks:
    """Cancellation checkpoints of one delegated run (called from its progress reports)."""

    def __init__(self, operation_id, interval: float = 1.0):
        self.operation_id = operation_id
        self.interval = interval
        self.last = time.monotonic()

    def check(self) -> None:
        if _CANCEL.is_set():
            raise OperationCancelled("the worker was stopped; the run ended at a checkpoint")
        if self.operation_id is None or time.monotonic() - self.last < self.interval:
            return
        self.last = time.monotonic()
        from fiftyone.operators.executor import ExecutionRunState

        try:
            doc = _service().get(self.operation_id)
        except Exception:  # a database hiccup must not end a long run
            return
        if doc is not None and doc.run_state == ExecutionRunState.FAILED:
            raise OperationCancelled(f"operation {self.operation_id} was marked as failed")

    def record(self, error: BaseException) -> None:
        """Add what the run completed to the recorded error of an operation already marked failed."""
        if self.operation_id is None:
            return
        from fiftyone.operators.executor import ExecutionResult, ExecutionRunState

        try:
            service = _service()
            doc = service.get(self.operation_id)
            if doc is None or doc.run_state != ExecutionRunState.FAILED:
                return  # still running: FiftyOne records the traceback (with the run's notes) itself
            before = (doc.result.error if doc.result is not None else None) or "marked as failed"
            message = "".join(traceback.format_exception_only(error)).strip()
            service.set_failed(self.operation_id, result=ExecutionResult(error=f"{before}\n{message}",
                                                                         error_message=message),
                               required_state=ExecutionRunState.FAILED)
        except Exception:  # never hide the run's own error
            pass


def progress_checks(ctx) -> _ProgressChecks:
    """Checkpoints for a delegated run: `check()` raises OperationCancelled once the run should stop."""
    op_id = getattr(ctx, "_delegated_operation_id", None) or ctx.request_params.get("run_doc")
    return _ProgressChecks(op_id)


def _service():
    from fiftyone.operators.delegated import DelegatedOperationService

    return DelegatedOperationService()


def _mark_interrupted(operation_id) -> None:
    from fiftyone.operators.executor import ExecutionResult, ExecutionRunState

    _service().set_failed(operation_id, result=ExecutionResult(error="the worker was interrupted"),
                          required_state=ExecutionRunState.RUNNING)


def run_worker(
    device: str = "auto",
    max_operations: int | None = None,
    idle_exit: float | None = None,
    poll_interval: float = 2.0,
    monitor: bool = False,
    monitor_interval: float = 60.0,
    operator: str | None = None,
    echo: Callable[[str], None] = print,
) -> dict:
    """Run queued delegated operations, oldest first, until stopped; returns completed and failed counts.

    Stops after `max_operations` operations, after the queue stayed empty for `idle_exit` seconds,
    or on SIGTERM / Ctrl-C (after the running operation; a second signal cancels it at its next
    progress checkpoint, a third exits at once and marks it failed). `monitor=True` runs each
    operation in a child process that is killed when the operation is marked failed. `operator`
    (a URI, or an operator name of this plugin) restricts the worker to one operator.
    """
    from fiftyone.factory import DelegatedOperationPagingParams, SortByField, SortDirection
    from fiftyone.operators.executor import ExecutionRunState

    from fiftyone_diffusion.plugins.devices import DEVICE_ENV, resolve_device

    if max_operations is not None and max_operations < 1:
        raise InputError(f"max_operations must be at least 1, got {max_operations}")
    if poll_interval <= 0 or monitor_interval <= 0 or (idle_exit is not None and idle_exit < 0):
        raise InputError("poll_interval and monitor_interval must be positive and idle_exit >= 0")
    if device not in (None, "", "auto"):
        resolve_device(device)  # fails here, not in the first operation
        os.environ[DEVICE_ENV] = device  # child processes (--monitor) inherit it
    import fiftyone as fo

    import fiftyone_diffusion  # noqa: F401  (registers the CLIP zoo manifest)

    plugin_dir = check_plugin_installed()
    if operator and "/" not in operator:
        operator = f"{PLUGIN}/{operator}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    echo(f"database: {_redact(fo.config.database_uri)}")
    echo(f"plugins dir: {fo.config.plugins_dir} ({PLUGIN} at {plugin_dir})")
    echo(f"device: {resolve_device('auto')}" + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""))
    echo(f"waiting for {operator or 'queued operations'}" + (" (monitored child processes)" if monitor else ""))

    service = _service()
    paging = DelegatedOperationPagingParams(sort_by=SortByField.QUEUED_AT, sort_direction=SortDirection.ASCENDING,
                                            limit=1)
    state = {"signals": 0, "running": None}
    stop = threading.Event()

    def on_signal(signum, frame):
        state["signals"] += 1
        stop.set()
        if state["signals"] == 1:
            echo("stopping after the running operation (signal again to cancel it)")
        elif state["signals"] == 2 and not monitor:
            _CANCEL.set()
            echo("cancelling the running operation at its next checkpoint (signal again to exit now)")
        elif monitor or state["running"] is None:
            raise KeyboardInterrupt  # FiftyOne terminates a monitored child; marked failed below
        else:  # the operation runs in a thread of this process that nothing can stop: exit now
            _mark_interrupted(state["running"])
            echo(f"interrupted: operation {state['running']} marked as failed")
            os._exit(130)

    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    ran: list[dict] = []
    reason = "signal"
    idle_since = time.monotonic()
    try:
        while not stop.is_set():
            if max_operations is not None and len(ran) >= max_operations:
                reason = "max-operations"
                break
            queued = service.list_operations(operator=operator, run_state=ExecutionRunState.QUEUED, paging=paging)
            if not queued:
                if idle_exit is not None and time.monotonic() - idle_since >= idle_exit:
                    reason = "idle"
                    break
                stop.wait(poll_interval)
                continue
            op = queued[0]
            state["running"] = op.id
            try:
                outcome = service.execute_operation(op, log=True, monitor=monitor,
                                                    check_interval_seconds=monitor_interval)
            except KeyboardInterrupt:
                _mark_interrupted(op.id)
                echo(f"interrupted: operation {op.id} marked as failed")
                raise
            finally:
                state["running"] = None
                _CANCEL.clear()
            if outcome is None:
                continue  # another worker claimed it first
            doc = service.get(op.id)
            run_state = doc.run_state if doc is not None else "deleted"
            error = (doc.result.error if doc is not None and doc.result is not None else None) or outcome.error
            ran.append({"id": str(op.id), "operator": op.operator, "state": run_state,
                        "error": error.strip().splitlines()[-1] if error and run_state != "completed" else None})
            echo(f"operation {op.id} ({op.operator}): {run_state}")
            idle_since = time.monotonic()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    completed = sum(r["state"] == ExecutionRunState.COMPLETED for r in ran)
    return {"completed": completed, "failed": len(ran) - completed, "stopped": reason, "operations": ran}
