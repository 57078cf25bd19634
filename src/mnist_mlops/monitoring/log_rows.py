"""The inference log's writer at work: a flush's queued requests made arrays, and remembered.

Each queued request is one flat tuple, `(ROWS, request id, time, images,
version, client id, *probabilities)` (inference_log.py). The writer turns a
flush's tuples into a part's arrays in whole-array steps, into scratch
arrays it keeps from one flush to the next: a second's images are megabytes,
and fresh arrays for them each second cost a page fault per 4 KiB. It also
remembers each request it took, so that feedback finds a request this
process answered without the request itself paying for it.
"""

from __future__ import annotations

from itertools import chain

import numpy as np

from mnist_mlops.monitoring.features import image_features

# Requests a log remembers for feedback: the last RECENT_REQUESTS / 2 at least, this many at most.
RECENT_REQUESTS = 100_000
# Scratch arrays are kept up to this size; a bigger flush gets arrays of its own.
SCRATCH_BYTES = 32 * 1024 * 1024


class RecentRequests:
    """How many images each request a log took lately had; the writer adds, anyone looks.

    Two plain dicts, the newer filled until it holds half, then the older
    dropped. Each dict operation is atomic under the GIL; a look-up during a
    swap misses only what was about to be forgotten anyway.
    """

    def __init__(self, most: int = RECENT_REQUESTS) -> None:
        self.most = most
        self._recent: dict[str, int] = {}
        self._older: dict[str, int] = {}

    def add(self, batch: list[tuple]) -> None:
        recent = self._recent
        for item in batch:
            if item[0] == "rows":
                recent[item[1]] = len(item[3])
                if len(recent) >= self.most // 2:
                    self._older, self._recent = recent, {}
                    recent = self._recent

    def get(self, request_id: str) -> int | None:
        images = self._recent.get(request_id)
        return self._older.get(request_id) if images is None else images


class Scratch:
    """Arrays the writer reuses from flush to flush, up to SCRATCH_BYTES each."""

    def __init__(self) -> None:
        self._arrays: dict[np.dtype, np.ndarray] = {}

    def array(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        size = int(np.prod(shape)) * dtype.itemsize
        if size > SCRATCH_BYTES:
            return np.empty(shape, dtype)
        kept = self._arrays.get(dtype)
        if kept is None or kept.nbytes < size:
            kept = self._arrays[dtype] = np.empty(size // dtype.itemsize, dtype)
        return kept[: size // dtype.itemsize].reshape(shape)


def rows_arrays(
    rows: list[tuple], scratch: Scratch, name: str, version: str, pixels: bool
) -> dict[str, np.ndarray]:
    """A part's arrays for the queued requests `rows`, all of one model version.

    The pixels array is scratch's: it is good until the next call.
    """
    batches = [item[3] for item in rows]
    counts = np.array([len(images) for images in batches])
    images = scratch.array((int(counts.sum()), *batches[0].shape[1:]), np.float32)
    np.concatenate(batches, out=images)
    np.clip(images, 0, 255, out=images)
    raw = scratch.array(images.shape, np.uint8)
    np.rint(images, out=raw, casting="unsafe")  # rounded to the nearest, then made bytes
    single = len(images) == len(rows)  # one image a request: nothing to repeat

    def per_image(values: np.ndarray) -> np.ndarray:
        return values if single else np.repeat(values, counts)

    position = np.zeros(len(images), np.int16)
    if not single:
        position = (np.arange(len(images)) - per_image(np.cumsum(counts) - counts)).astype(np.int16)
    arrays = {
        "request_id": per_image(np.array([item[1] for item in rows])),
        "client_request_id": per_image(np.array([item[5] for item in rows], dtype=str)),
        "position": position,
        "time": per_image(np.array([item[2] for item in rows], dtype=np.float64)),
        "probabilities": np.fromiter(
            chain.from_iterable(item[6:] for item in rows),
            np.float32,
            sum(len(item) - 6 for item in rows),
        ).reshape(len(images), -1),
        "model_name": np.array(name),
        "model_version": np.array(version),
    }
    arrays["digit"] = arrays["probabilities"].argmax(axis=1).astype(np.int8)
    if pixels:
        arrays["pixels"] = raw
    else:
        arrays["features"] = image_features(raw)
    return arrays
