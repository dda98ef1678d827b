"""Bounded-memory walks over FiftyOne views: one short query per chunk, keyed on the sample id."""

from __future__ import annotations

from collections.abc import Iterator

from fiftyone_diffusion.errors import InputError

CHUNK_SIZE = 1024


def iter_id_chunks(view, fields: list[str], chunk_size: int = CHUNK_SIZE) -> Iterator[tuple[list, ...]]:
    """Yield `(ids, field1_values, ...)` for at most `chunk_size` samples of `view` at a time, in id order.

    Each chunk is its own query (`_id` greater than the last one seen: keyset pagination), so memory
    does not grow with the view, no database cursor idles while the caller works on a chunk, and a
    view that loses samples as the caller writes (such as `exists(field, False)`) is walked exactly
    once, with no sample skipped.
    """
    if chunk_size <= 0:
        raise InputError(f"chunk_size must be positive, got {chunk_size}")
    last = None
    while True:
        after = [] if last is None else [{"$match": {"_id": {"$gt": last}}}]
        page = view.mongo([*after, {"$sort": {"_id": 1}}, {"$limit": chunk_size}])
        ids, *values = page.values(["_id", *fields])
        if not ids:
            return
        last = ids[-1]
        yield ([str(i) for i in ids], *values)
        if len(ids) < chunk_size:
            return
