"""Shared pieces of the thin App operators: progress bridging and the target view."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fiftyone_diffusion.errors import InputError


def heavy_config(name: str, label: str, **kwargs) -> foo.OperatorConfig:
    """Config of a heavy operator: a generator (progress in the App), delegated by default."""
    return foo.OperatorConfig(
        name=name,
        label=label,
        dynamic=kwargs.pop("dynamic", False),
        execute_as_generator=True,
        allow_immediate_execution=True,
        allow_delegated_execution=True,
        default_choice_to_delegated=True,
        **kwargs,
    )


def run_with_progress(ctx, fn: Callable[..., dict], progress_label: str, **kwargs):
    """Run an SDK function that accepts `on_progress(done, total, ...)`, reporting its progress.

    Delegated runs store progress on the run (`ctx.set_progress`) and return the SDK's result,
    which FiftyOne records on the operation; each report is also a checkpoint where a run that was
    marked failed (or whose worker cancels it) stops, its error saying what it completed. Immediate
    App runs get a generator that yields `set_progress` events while the work runs in a thread.
    """
    if getattr(ctx, "delegated", False):
        from fiftyone_diffusion.worker import progress_checks

        checks = progress_checks(ctx)

        def report(done, total, *rest):
            ctx.set_progress(progress=done / max(total, 1), label=f"{progress_label} {done}/{total}")
            checks.check()

        try:
            return fn(on_progress=report, progress=False, **kwargs)
        except BaseException as e:
            checks.record(e)
            raise
    return _immediate(ctx, fn, progress_label, kwargs)


def _immediate(ctx, fn: Callable[..., dict], label: str, kwargs: dict) -> Iterator:
    events: queue.Queue = queue.Queue()
    outcome: dict = {}

    def work():
        try:
            outcome["result"] = fn(on_progress=lambda done, total, *rest: events.put((done, total)),
                                   progress=False, **kwargs)
        except BaseException as e:  # re-raised in the operator's own thread below
            outcome["error"] = e
        finally:
            events.put(None)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    while (item := events.get()) is not None:
        done, total = item
        yield ctx.ops.set_progress(progress=done / max(total, 1), label=f"{label} {done}/{total}")
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    if ctx.dataset is not None:
        yield ctx.ops.reload_dataset()
    yield ctx.ops.set_progress(progress=1.0, label=f"{label}: done")


def target_view(ctx):
    """The view the user chose: the whole dataset, the current view, or the selected samples."""
    target = ctx.params.get("target", "DATASET")
    if target == "SELECTED_SAMPLES" and ctx.selected:
        return ctx.dataset.select(ctx.selected)
    if target == "CURRENT_VIEW":
        return ctx.view
    return ctx.dataset


def target_input(ctx, inputs: types.Object) -> None:
    choices = types.RadioGroup()
    choices.add_choice("DATASET", label="Whole dataset")
    choices.add_choice("CURRENT_VIEW", label="Current view")
    if ctx.selected:
        choices.add_choice("SELECTED_SAMPLES", label="Selected samples")
    inputs.enum("target", choices.values(), default="DATASET", view=choices, label="Target")


def require(value, message: str):
    if value is None or value == "":
        raise InputError(message)
    return value
