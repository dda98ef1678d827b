"""Dataset-level CLIP work: embeddings (resumable, robust to broken files), similarity indexes, text search,
zero-shot labels."""

from __future__ import annotations

import inspect
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from fiftyone_diffusion.brain.image_loading import ImageLoadError, load_rgb
from fiftyone_diffusion.brain.streaming import CHUNK_SIZE, iter_id_chunks
from fiftyone_diffusion.errors import InputError
from fiftyone_diffusion.plugins.clip import ClipEmbedder, load_clip_model, model_spec

ProgressFn = Callable[[int, int], None]
ERROR_TAG = "clip_load_error"
DEFAULT_BRAIN_KEY = "clip_sim"
logger = logging.getLogger(__name__)


class _ImageFiles(torch.utils.data.Dataset):
    """Preprocessed images by index; a broken file yields its error instead of raising."""

    def __init__(self, paths: list[str], transform, min_size: int):
        self.paths, self.transform, self.min_size = paths, transform, min_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image, decode = load_rgb(self.paths[i], self.min_size)
            return i, self.transform(image), None, decode
        except ImageLoadError as e:
            return i, None, str(e), None


def _collate(items):
    good = [it for it in items if it[1] is not None]
    x = torch.stack([it[1] for it in good]) if good else None
    return [it[0] for it in good], x, [(it[0], it[2]) for it in items if it[1] is None], [it[3] for it in good]


def default_num_workers() -> int:
    """DataLoader workers that overlap decoding with compute: none on a single usable core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 0 if cores <= 1 else min(4, cores - 1)


def _batches(model: ClipEmbedder, paths: list[str], batch_size: int, num_workers: int | None) -> Iterator:
    loader = torch.utils.data.DataLoader(
        _ImageFiles(paths, model.transforms, model.backend.image_size), batch_size=batch_size,
        num_workers=default_num_workers() if num_workers is None else num_workers, collate_fn=_collate,
    )
    yield from loader


def _check(batch_size: int, num_workers: int | None) -> None:
    if batch_size <= 0:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    if num_workers is not None and num_workers < 0:
        raise InputError(f"num_workers must be >= 0, got {num_workers}")


def _todo(view, field: str, skip_existing: bool):
    if skip_existing and view._dataset.has_field(field):
        return view.exists(field, False)
    return view


def _record_failures(dataset, failures: list[tuple[str, str]], error_field: str) -> None:
    if failures:
        dataset.set_values(error_field, dict(failures), key_field="id")
        dataset.select([i for i, _ in failures]).tag_samples(ERROR_TAG)


def _clear_fixed(dataset, ok_ids: list[str], error_field: str) -> None:
    """Samples that failed before and worked now lose that error, and the tag once no error is left."""
    if not ok_ids or not dataset.has_field(error_field):
        return
    fixed = dataset.select(ok_ids).exists(error_field)
    fixed_ids = fixed.values("id")
    if not fixed_ids:
        return
    dataset.set_values(error_field, dict.fromkeys(fixed_ids), key_field="id")
    other = [f for f in dataset.get_field_schema() if f.endswith("_error") and f != error_field]
    clean = dataset.select(fixed_ids)
    for field in other:
        clean = clean.exists(field, False)
    clean.untag_samples(ERROR_TAG)


def _run(view, model: ClipEmbedder, batch_size: int, num_workers: int | None, desc: str, progress: bool,
         on_progress: ProgressFn | None, write: Callable[[list[str], torch.Tensor], None], error_field: str) -> dict:
    """Embed every image of `view` batch by batch, calling `write(ids, embeddings)` after each batch.

    The view is read in id-chunks (`iter_id_chunks`), so memory is flat in the number of samples;
    broken files are recorded after each chunk.
    """
    total = len(view)
    failures: list[tuple[str, str]] = []
    decodes: Counter = Counter()
    bar = tqdm(total=total, desc=desc, disable=not progress)
    done = 0
    for ids, paths in iter_id_chunks(view, ["filepath"], max(CHUNK_SIZE, 4 * batch_size)):
        chunk_failures: list[tuple[str, str]] = []
        chunk_ok: list[str] = []
        for rows, x, failed, decode in _batches(model, paths, batch_size, num_workers):
            if x is not None:
                write([ids[r] for r in rows], model.embed_images(x))
                chunk_ok += [ids[r] for r in rows]
            chunk_failures += [(ids[r], reason) for r, reason in failed]
            decodes.update(decode)
            done += len(rows) + len(failed)
            bar.update(len(rows) + len(failed))
            if on_progress:
                on_progress(done, total)
        _record_failures(view._dataset, chunk_failures, error_field)
        _clear_fixed(view._dataset, chunk_ok, error_field)
        failures += chunk_failures
    bar.close()
    return {"processed": done - len(failures), "failed": len(failures), "failed_ids": [i for i, _ in failures],
            "errors": dict(failures), "error_field": error_field, "model": model.name,
            "precision": str(model.dtype).replace("torch.", ""), "decode": dict(decodes)}


def compute_clip_embeddings(
    view,
    model: str | ClipEmbedder = "digit-clip",
    embeddings_field: str = "clip_embeddings",
    batch_size: int = 64,
    num_workers: int | None = None,
    skip_existing: bool = True,
    pretrained: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    on_progress: ProgressFn | None = None,
) -> dict:
    """Store normalised CLIP image embeddings in `embeddings_field`; resumable (only samples without one run).

    Embeddings are written after every batch, so an interrupted run keeps its work. Files that cannot
    be decoded are skipped: they get `<field>_error` and the `clip_load_error` tag, and their ids are in
    the result's `failed_ids`.
    """
    _check(batch_size, num_workers)
    clip = load_clip_model(model, pretrained, device, precision)
    dataset = view._dataset
    todo = _todo(view, embeddings_field, skip_existing)
    skipped = len(view) - len(todo)  # counted now: `todo` is a lazy view that shrinks as embeddings land

    def write(ids: list[str], emb: torch.Tensor) -> None:
        dataset.set_values(embeddings_field, dict(zip(ids, emb.numpy().astype(np.float32), strict=True)),
                           key_field="id")

    result = _run(todo, clip, batch_size, num_workers, "clip-embeddings", progress, on_progress, write,
                  f"{embeddings_field}_error")
    return {"embeddings_field": embeddings_field, "embedded": result.pop("processed"),
            "skipped_existing": skipped, **result}


def zero_shot_classify(
    view,
    classes: list[str],
    model: str | ClipEmbedder = "digit-clip",
    templates: list[str] | None = None,
    temperature: float | None = None,
    label_field: str = "prediction",
    store_logits: bool = True,
    batch_size: int = 64,
    num_workers: int | None = None,
    pretrained: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    on_progress: ProgressFn | None = None,
) -> dict:
    """Label each sample with `fo.Classification(label, confidence, logits)` from CLIP zero-shot scores.

    Class text embeddings are the mean of the normalised embeddings of `templates` (default: the
    digit templates for "0".."9", generic ones otherwise); confidence is the softmax of the
    cosine similarities divided by `temperature` (default: the model's learned temperature).
    """
    classes = [str(c) for c in classes or []]
    if len(classes) < 2:
        raise InputError("zero-shot classification needs at least two classes")
    if temperature is not None and temperature <= 0:
        raise InputError(f"temperature must be positive, got {temperature}")
    if templates is not None and any("{" not in t for t in templates):
        raise InputError("every template needs a placeholder: {c} (class), or {d} / {w} for digits")
    _check(batch_size, num_workers)
    clip = load_clip_model(model, pretrained, device, precision)
    clip.set_classes(classes, list(templates) if templates else None)
    clip.config.temperature = temperature
    dataset = view._dataset

    def write(ids: list[str], emb: torch.Tensor) -> None:
        labels = clip.to_labels(clip.logits_for(emb), store_logits=store_logits)
        dataset.set_values(label_field, dict(zip(ids, labels, strict=True)), key_field="id")

    result = _run(view, clip, batch_size, num_workers, "zero-shot", progress, on_progress, write,
                  f"{label_field}_error")
    return {"label_field": label_field, "classified": result.pop("processed"), "classes": classes,
            "temperature": temperature or round(1 / clip.backend.logit_scale, 5), **result}


def build_similarity_index(
    view,
    model: str | ClipEmbedder = "digit-clip",
    brain_key: str = DEFAULT_BRAIN_KEY,
    backend: str = "sklearn",
    embeddings_field: str = "clip_embeddings",
    batch_size: int = 64,
    num_workers: int | None = None,
    pretrained: str | None = None,
    overwrite: bool = True,
    device: str = "auto",
    progress: bool = True,
    on_progress: ProgressFn | None = None,
    **backend_kwargs,
) -> dict:
    """Embed what lacks an embedding, then index with `fiftyone.brain.compute_similarity` under the model's
    zoo *name*, so `search` / the App's text search work in any process. `backend_kwargs` go to the
    backend (e.g. lancedb `uri`, Qdrant `url`)."""
    import fiftyone.brain as fob

    zoo_name, zoo_kwargs = model_spec(model, pretrained)
    dataset = view._dataset
    if brain_key in dataset.list_brain_runs() and not overwrite:
        raise InputError(f"brain key {brain_key!r} exists; pass overwrite=True or another brain_key")
    emb = compute_clip_embeddings(view, model, embeddings_field, batch_size, num_workers, True, pretrained, device,
                                  progress=progress, on_progress=on_progress)
    if brain_key in dataset.list_brain_runs():
        _delete_index(dataset, brain_key, backend, backend_kwargs)
    indexed = view.exists(embeddings_field)
    if len(indexed) == 0:
        raise InputError("no sample could be embedded: nothing to index")
    fob.compute_similarity(indexed, embeddings=embeddings_field, model=zoo_name, model_kwargs=zoo_kwargs or None,
                           brain_key=brain_key, backend=backend, **backend_kwargs)
    return {"brain_key": brain_key, "backend": backend, "model": zoo_name, "model_kwargs": zoo_kwargs,
            "indexed": len(indexed), "failed": emb["failed"], "failed_ids": emb["failed_ids"]}


def _delete_index(dataset, brain_key: str, backend: str, backend_kwargs: dict) -> None:
    """Delete a similarity run and its index: `delete_brain_run` alone leaves a vector database's collection."""
    config = dataset.get_brain_info(brain_key).config
    if config.method != "sklearn":  # sklearn keeps nothing outside the dataset (and loading it loads every vector)
        accepted = inspect.signature(config.load_credentials).parameters if config.method == backend else {}
        creds = {k: v for k, v in backend_kwargs.items() if k in accepted}
        try:
            dataset.load_brain_results(brain_key, cache=False, **creds).cleanup()
        except Exception as e:  # an unreachable server or a missing package must not block replacing the run
            logger.warning("could not remove the %s index of brain run %r: %s", config.method, brain_key, e)
    dataset.delete_brain_run(brain_key)


def search(view, text: str, k: int = 25, brain_key: str | None = None, dist_field: str | None = None):
    """The `k` samples most similar to `text`, best first (a view)."""
    if not text or not text.strip():
        raise InputError("the search text is empty")
    if k <= 0:
        raise InputError(f"k must be positive, got {k}")
    dataset = view._dataset
    if brain_key is None:
        keys = [key for key in dataset.list_brain_runs(type="similarity")
                if dataset.get_brain_info(key).config.supports_prompts]
        if len(keys) != 1:
            raise InputError(f"pass brain_key: the dataset has {len(keys)} text-searchable similarity indexes "
                             f"({', '.join(keys) or 'none; run build_similarity_index first'})")
        brain_key = keys[0]
    elif brain_key not in dataset.list_brain_runs():
        raise InputError(f"no similarity index {brain_key!r} on dataset {dataset.name!r}")
    return view.sort_by_similarity(text, k=k, brain_key=brain_key, dist_field=dist_field)
