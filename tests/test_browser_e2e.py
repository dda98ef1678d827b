"""The App in a real browser: generate samples from the operator browser, then both panels.

Debian's chromium driven by Playwright (never a downloaded browser), the App server on 127.0.0.1
against the test session's private database. Screenshots are kept under the test's tmp folder
(the path is printed); E2E_SCREENSHOTS_DIR=folder copies them there too. E2E_DDPM_MODEL=ddpm-mnist
generates with a real model instead of the tiny untrained one (for the README's screenshots).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def app_server(folder: str, unset: tuple[str, ...] = ()):
    """The App's server (what `fiftyone app launch --remote` starts) on 127.0.0.1, in its own process group.

    No Python session is attached: a session that (re)connects pushes its own state to the open
    page and would reset it in the middle of the test. `unset`: environment variables the server
    must not inherit from the test process.
    """
    port = _free_port()
    log_path = os.path.join(folder, "app-server.log")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fiftyone.server.main", "--port", str(port), "--address", "127.0.0.1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder,
            env={**env, "FIFTYONE_DO_NOT_TRACK": "true"})
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.time() + 180
            while True:
                try:
                    urllib.request.urlopen(url, timeout=2).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.time() > deadline:
                        pytest.fail(f"the App server did not start; see {log_path}")
                    time.sleep(0.5)
            yield url
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue


class Shots:
    def __init__(self, page, folder):
        self.page, self.folder, self.n = page, folder, 0
        os.makedirs(folder, exist_ok=True)

    def __call__(self, name: str, locator=None) -> str:
        self.n += 1
        path = os.path.join(self.folder, f"{self.n:02d}-{name}.png")
        (locator or self.page).screenshot(path=path)
        return path


def _keep_screenshots(folder: str) -> None:
    """E2E_SCREENSHOTS_DIR=folder keeps a copy of the test's screenshots (e.g. for the README)."""
    copy_to = os.environ.get("E2E_SCREENSHOTS_DIR")
    if copy_to:
        shutil.copytree(folder, copy_to, dirs_exist_ok=True)


def _dismiss_popovers(page) -> None:
    for text in ("Dismiss", "Got it"):
        button = page.get_by_role("button", name=text)
        if button.count() and button.first.is_visible():
            button.first.click()


def _close_modal(page) -> None:
    """The App may restore an open sample modal: close it."""
    for _ in range(3):
        if not page.locator("[data-cy=modal]").count():
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(500)


def _open_panel(page, name: str, label: str, scope=None):
    root = scope or page
    content = root.locator(f"[data-cy=panel-content-{name}]")
    if content.count() and content.first.is_visible():  # restored from a saved layout
        return content.first
    tab = root.get_by_text(label, exact=True)
    if tab.count():  # an existing tab (the modal lists its panels as tabs)
        tab.first.click()
    else:
        root.locator("[data-cy=new-panel-btn]").first.click()
        page.locator(f"[data-cy=new-panel-option-{name}]").first.click()
    content = root.locator(f"[data-cy=panel-content-{name}]").first
    content.wait_for(state="visible", timeout=60_000)
    return content


def _wait_images_loaded(page, images) -> None:
    page.wait_for_function("els => els.length > 0 && els.every(e => e.complete && e.naturalWidth > 0)",
                           arg=images.element_handles(), timeout=30_000)


def _run_generate_operator(page, shots, model: str) -> None:
    page.locator("body").press("`")
    search = page.locator("[data-cy=operators-browser-search]")
    search.wait_for(timeout=30_000)
    search.fill("Generate DDPM samples")
    page.get_by_text("Generate DDPM samples", exact=True).last.click()
    prompt = page.locator("[data-cy=operators-prompt-modal]")
    prompt.wait_for(timeout=30_000)
    page.wait_for_timeout(1000)
    # inputs in form order: num_samples is the first number field, model the second text field
    prompt.get_by_role("spinbutton").nth(0).fill("8")
    prompt.get_by_role("textbox").nth(1).fill(model)
    # steps: few for the tiny test model, the shipped default (20) for a real model's screenshots
    prompt.get_by_role("spinbutton").nth(1).fill("20" if os.environ.get("E2E_DDPM_MODEL") else "6")
    shots("operator-form", prompt)
    execute = prompt.get_by_role("button", name="Execute", exact=True)
    if not execute.count():  # delegated by default: choose immediate execution in the split button
        prompt.get_by_role("button", name="Schedule", exact=True).click()
        shots("execution-choices")
        page.get_by_text("Execute", exact=True).last.click()
    else:
        execute.first.click()


def test_generate_in_the_app_then_both_panels(tiny_ddpm, dataset_name, mnist_dir, tmp_path):
    import fiftyone as fo
    from playwright.sync_api import sync_playwright

    from fiftyone_diffusion import load_mnist

    if not os.path.isfile(CHROMIUM):
        pytest.fail(f"chromium is missing at {CHROMIUM}: install it (apt-get install -y chromium; scripts/setup.sh)")
    load_mnist(dataset_name, "test", max_samples=4, data_dir=mnist_dir, media_dir=str(tmp_path / "mnist"))
    folder = str(tmp_path / "screenshots")
    print(f"\nscreenshots: {folder}")
    with app_server(str(tmp_path)) as app_url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1250})
        shots = Shots(page, folder)
        try:
            page.goto(f"{app_url}/datasets/{dataset_name}", wait_until="domcontentloaded")
            page.locator("[data-cy=fo-grid] [data-cy=looker]").first.wait_for(timeout=120_000)
            _dismiss_popovers(page)
            _close_modal(page)
            shots("dataset")

            model = os.environ.get("E2E_DDPM_MODEL") or tiny_ddpm
            _run_generate_operator(page, shots, model)
            ds = fo.load_dataset(dataset_name)
            deadline = time.time() + 180
            while len(ds.match_tags("generated")) < 8 and time.time() < deadline:
                time.sleep(1)
                ds.reload()
            generated = ds.match_tags("generated")
            assert len(generated) == 8, "the operator did not add 8 samples"
            assert set(generated.values("generation.model")) == {model}
            assert all(os.path.isfile(p) for p in generated.values("trajectory.frames_path"))
            assert len(generated.exists("prediction")) == 8
            page.wait_for_timeout(2000)
            _dismiss_popovers(page)
            shots("generated")

            # a generated sample in the modal, then the noise trajectory panel next to it
            sample_id = generated.first().id
            page.goto(f"{app_url}/datasets/{dataset_name}?id={sample_id}", wait_until="domcontentloaded")
            modal = page.locator("[data-cy=modal]")
            modal.wait_for(timeout=60_000)
            _dismiss_popovers(page)
            panel = _open_panel(page, "noise_trajectory", "Noise trajectory", modal)
            panel.get_by_text("Noise schedule").first.wait_for(timeout=60_000)
            frames = panel.locator("img[src*='/media?filepath=']")
            frames.first.wait_for(timeout=30_000)
            _wait_images_loaded(page, frames)
            assert frames.count() >= 3  # x_t, predicted x_0 and the strip
            assert panel.locator(".js-plotly-plot .scatterlayer .trace").count() >= 3
            shots("noise-trajectory-modal")
            # no forward trajectory yet: the panel's button computes it
            panel.get_by_role("button", name="Compute forward trajectory").click()
            panel.get_by_text("Forward noising", exact=False).first.wait_for(timeout=60_000)
            page.wait_for_timeout(1000)
            _wait_images_loaded(page, frames)
            assert frames.count() >= 3 + 6
            ds.reload()
            assert ds[sample_id].forward_trajectory.num_frames == 6
            shots("noise-trajectory-panel", panel)

            # the grid: generation overview, click a bar, the App's view is filtered to that label
            _close_modal(page)
            page.goto(f"{app_url}/datasets/{dataset_name}", wait_until="domcontentloaded")
            page.locator("[data-cy=fo-grid] [data-cy=looker]").first.wait_for(timeout=60_000)
            _dismiss_popovers(page)
            _close_modal(page)
            overview = _open_panel(page, "generation_overview", "Generation overview")
            bars = overview.locator(".js-plotly-plot .barlayer .point path")
            bars.first.wait_for(timeout=60_000)
            shots("generation-overview")
            counts = generated.count_values("prediction.label")
            label = sorted(counts, key=lambda k: int(k))[0]
            bars.first.click(force=True)
            grid = page.locator("[data-cy=fo-grid] [data-cy=looker]")
            deadline = time.time() + 30
            while grid.count() != counts[label] and time.time() < deadline:
                page.wait_for_timeout(500)
            shots("filtered-by-label")
            assert grid.count() == counts[label]
        except Exception:
            shots("failure")
            raise
        finally:
            browser.close()
    _keep_screenshots(folder)


TEXT_QUERY = "a handwritten seven"


def _first_page_of(responses: list, stage_cls: str):
    """The latest first-page samples query whose view has a `stage_cls` stage: (view, sample ids, samples)."""
    for resp in reversed(responses):
        variables = resp.request.post_data_json["variables"]
        view = variables.get("view") or []
        if variables.get("after") is None and any(stage["_cls"] == stage_cls for stage in view):
            nodes = [e["node"] for e in resp.json()["data"]["samples"]["edges"]]
            samples = [json.loads(n["sample"]) if isinstance(n["sample"], str) else n["sample"] for n in nodes]
            return view, [n["id"] for n in nodes], samples
    return None


def _wait_for(page, fn, seconds: float):
    deadline = time.time() + seconds
    while (result := fn()) is None and time.time() < deadline:
        page.wait_for_timeout(500)
    return result


def test_text_search_in_the_app_finds_sevens(dataset_name, mnist_dir, tmp_path):
    """Issue 4: 'a handwritten seven' typed into the grid's sort-by-text-similarity action over 1,000 MNIST
    test digits; the App's own samples query returns >= 9 sevens in its top 10.

    The App server does not inherit the test process's zoo manifest setting: it finds `digit-clip` the way
    a user's server does, through the plugin. FiftyOne 1.22's App runs the search as the
    `@voxel51/panels/similarity_search` operator and shows the result as an ordered `Select` view.
    """
    from playwright.sync_api import sync_playwright

    from fiftyone_diffusion import build_similarity_index, compute_clip_embeddings, load_mnist, search
    from fiftyone_diffusion.plugins.clip_zoo import ENV_VAR

    if not os.path.isfile(CHROMIUM):
        pytest.fail(f"chromium is missing at {CHROMIUM}: install it (apt-get install -y chromium; scripts/setup.sh)")
    ds = load_mnist(dataset_name, "test", max_samples=1000, data_dir=mnist_dir, media_dir=str(tmp_path / "mnist"))
    assert compute_clip_embeddings(ds, "digit-clip", num_workers=0, progress=False)["embedded"] == 1000
    index = build_similarity_index(ds, model="digit-clip", brain_key="digits", num_workers=0, progress=False)
    assert index["indexed"] == 1000 and index["model"] == "digit-clip"
    sdk_ids = search(ds, TEXT_QUERY, k=25, brain_key="digits").values("id")
    folder = str(tmp_path / "screenshots")
    print(f"\nscreenshots: {folder}")
    with app_server(str(tmp_path), unset=(ENV_VAR,)) as app_url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1250})
        shots = Shots(page, folder)
        samples_queries: list = []
        page.on("response", lambda r: samples_queries.append(r) if r.url.endswith("/graphql") and
                "paginateSamplesQuery" in (r.request.post_data or "") else None)
        try:
            page.goto(f"{app_url}/datasets/{dataset_name}", wait_until="domcontentloaded")
            page.locator("[data-cy=fo-grid] [data-cy=looker]").first.wait_for(timeout=120_000)
            _dismiss_popovers(page)
            _close_modal(page)

            page.locator("[data-cy=action-sort-by-similarity]").first.click()  # "Sort by text similarity"
            box = page.get_by_placeholder("Type anything!")
            box.wait_for(timeout=30_000)
            box.fill(TEXT_QUERY)
            shots("text-search-popover")
            with page.expect_response(lambda r: "/operators/execute" in r.url and
                                      "similarity_search" in (r.request.post_data or ""), timeout=240_000) as op:
                box.press("Enter")
            request = op.value.request.post_data_json
            assert request["params"]["query"] == TEXT_QUERY and request["params"]["brain_key"] == "digits"
            assert request["params"]["query_type"] == "text"
            body = op.value.json()
            assert op.value.ok and not body.get("error"), body

            # the Similarity Search panel opens; it shows a run that finishes while it is open in the grid by
            # itself, an already finished one on its "Show results" button
            sorted_page = _wait_for(page, lambda: _first_page_of(samples_queries, "fiftyone.core.stages.Select"), 15)
            if sorted_page is None:
                shots("similarity-search-panel")
                show = page.locator("button[aria-label='Show results']").first
                show.wait_for(timeout=30_000)
                page.wait_for_function("b => !b.disabled", arg=show.element_handle(), timeout=30_000)
                show.click(force=True)  # force: the run's sortable list row is aria-disabled, which Playwright inherits
                sorted_page = _wait_for(page, lambda: _first_page_of(samples_queries, "fiftyone.core.stages.Select"),
                                        60)
            assert sorted_page is not None, "the App never queried the samples of the search's result view"
            view, ids, samples = sorted_page
            select = dict(next(stage for stage in view if stage["_cls"] == "fiftyone.core.stages.Select")["kwargs"])
            # the App's result is the SDK's text search (near-ties may swap between processes)
            assert select["ordered"] is True and len(select["sample_ids"]) == 25
            assert ids[:10] == select["sample_ids"][:10]  # the grid shows them in the search's order
            assert len(set(select["sample_ids"]) & set(sdk_ids)) >= 23 and len(set(ids[:10]) & set(sdk_ids[:10])) >= 9
            labels = [s["ground_truth"]["label"] for s in samples[:10]]
            assert len(labels) == 10 and labels.count("7") >= 9, labels
            page.locator("[data-cy=fo-grid] [data-cy=looker]").first.wait_for(timeout=60_000)
            page.wait_for_timeout(2000)
            _dismiss_popovers(page)
            shots("text-search-sevens")
        except Exception:
            shots("failure")
            with open(os.path.join(str(tmp_path), "app-server.log")) as log:
                print(log.read()[-5000:])
            raise
        finally:
            browser.close()
    _keep_screenshots(folder)
