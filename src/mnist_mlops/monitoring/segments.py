"""A writer's parts merged into one segment file in a folder, a megabyte at a time.

A part is numpy's uncompressed npz: a zip of one `.npy` per array, each a
header and then the raw rows. An array with the same dtype and row shape in
every part (the pixels, the probabilities, the ids) is merged by writing one
header for all the rows and copying each part's bytes behind it, unparsed;
the zip's checksums are still checked on the way in and written on the way
out. What cannot be copied so (a file's scalars, which become one value per
row, and text whose width differs between parts) is small and is joined by
numpy. The parts are never held in memory whole: merging a second's parts at
a few thousand requests a second cost the writer more than writing them
(docs/benchmarks.md).
"""

from __future__ import annotations

import shutil
import zipfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from numpy.lib import format as npy

from mnist_mlops.atomic import atomic_path

CHUNK_BYTES = 1 << 20
ROWS_KEY = "request_id.npy"


def header(stream) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, Fortran order, dtype) of the `.npy` in `stream`, which is left at its data."""
    version = npy.read_magic(stream)
    if version == (1, 0):
        return npy.read_array_header_1_0(stream)
    if version == (2, 0):
        return npy.read_array_header_2_0(stream)
    raise ValueError(f"an array in format version {version}, which the log never writes")


def merge_folder_parts(parts: list[Path], target: Path) -> None:
    """Write the rows of `parts`, in order, as one npz at `target` (atomically, 0600).

    The arrays every part has are kept, as a reader joins files written with
    the pixels on and off.
    """
    with ExitStack() as stack:
        archives = [stack.enter_context(zipfile.ZipFile(part)) for part in parts]
        headers = [_headers(archive) for archive in archives]
        rows = [found[ROWS_KEY][0][0] for found in headers]
        names = [name for name in headers[0] if all(name in found for found in headers)]
        with (
            atomic_path(target, private=True) as temporary,
            zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED, allowZip64=True) as merged,
        ):
            for name in names:
                shapes = [found[name] for found in headers]
                with merged.open(name, "w", force_zip64=True) as out:
                    if _copyable(shapes):
                        _copy(archives, name, shapes, out)
                    else:
                        joined = [
                            _per_row(archive, name, count)
                            for archive, count in zip(archives, rows, strict=True)
                        ]
                        npy.write_array(out, np.concatenate(joined), allow_pickle=False)


def _headers(archive: zipfile.ZipFile) -> dict[str, tuple]:
    found = {}
    for name in archive.namelist():
        with archive.open(name) as stream:
            found[name] = header(stream)
    return found


def _copyable(shapes: list[tuple]) -> bool:
    """The same dtype (not objects), row shape and C order in every part: bytes can be joined."""
    first, _, dtype = shapes[0]
    return not dtype.hasobject and all(
        len(shape) >= 1 and shape[1:] == first[1:] and not fortran and kind == dtype
        for shape, fortran, kind in shapes
    )


def _copy(archives: list[zipfile.ZipFile], name: str, shapes: list[tuple], out) -> None:
    first, _, dtype = shapes[0]
    total = sum(shape[0] for shape, _, _ in shapes)
    npy.write_array_header_1_0(
        out,
        {"descr": npy.dtype_to_descr(dtype), "fortran_order": False, "shape": (total, *first[1:])},
    )
    for archive in archives:
        with archive.open(name) as stream:
            header(stream)
            shutil.copyfileobj(stream, out, CHUNK_BYTES)


def _per_row(archive: zipfile.ZipFile, name: str, rows: int) -> np.ndarray:
    with archive.open(name) as stream:
        values = npy.read_array(stream, allow_pickle=False)
    return np.full(rows, values) if values.ndim == 0 else values
