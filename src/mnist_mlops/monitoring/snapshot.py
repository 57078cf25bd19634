"""`mnist-mlops feedback snapshot`: served images with their true digits, as DVC-versioned data.

Gathers every image of the inference log that has a true digit, keeps the
rows of the previous snapshot (the log expires after its retention; a
snapshot keeps what it once held), drops duplicates, checks the result like
the raw MNIST data, writes data/feedback/feedback.npz atomically and runs
`dvc add` on it. The command adds it itself, so that the snapshot and the
`.dvc` file that a commit pins never disagree; committing stays the user's.

The same feedback gives the same bytes: rows in a fixed order, arrays in a
fixed order, zip entries with a fixed timestamp. A snapshot with nothing new
changes nothing that DVC or git tracks.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_mlops.atomic import atomic_path
from mnist_mlops.model.digits import DataError, check_split
from mnist_mlops.monitoring.log_files import ROWS, load_all, read_feedback

# Sorted by time, then request id and position; `images` and `labels` are what training reads.
COLUMNS = ("images", "labels", "time", "request_id", "position")
REQUEST_ID_DTYPE = "<U64"
# The earliest time a zip entry can carry: a fixed one keeps equal snapshots byte-identical.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class SnapshotError(ValueError):
    """The feedback cannot be snapshotted; nothing was written."""


@dataclass(frozen=True)
class SnapshotSummary:
    path: Path
    rows: int
    new: int
    duplicates: int
    without_pixels: int

    def __str__(self) -> str:
        return (
            f"feedback snapshot: {self.rows} images with true digits in {self.path} "
            f"({self.new} new, {self.duplicates} duplicates dropped, "
            f"{self.without_pixels} logged without pixels skipped)"
        )


def empty_snapshot() -> dict[str, np.ndarray]:
    return {
        "images": np.zeros((0, 28, 28), np.uint8),
        "labels": np.zeros(0, np.uint8),
        "time": np.zeros(0, np.float64),
        "request_id": np.zeros(0, REQUEST_ID_DTYPE),
        "position": np.zeros(0, np.int32),
    }


def load_snapshot(path: Path) -> dict[str, np.ndarray]:
    """A snapshot's arrays, checked; an empty snapshot when there is no file."""
    if not path.exists():
        return empty_snapshot()
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in COLUMNS}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
        raise SnapshotError(f"{path}: not a feedback snapshot ({error})") from None
    _check(str(path), arrays)
    return arrays


def labelled_log_rows(log_dir: Path | str) -> tuple[dict[str, np.ndarray], int]:
    """The logged images that have a true digit, and how many more had one but no pixels."""
    try:
        truth = read_feedback(log_dir)
        parts = load_all(log_dir, ROWS)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
        raise SnapshotError(f"{log_dir}: an unreadable inference log file ({error})") from None
    chosen = []
    without_pixels = 0
    for file, part in parts:
        keys = list(zip(part["request_id"].tolist(), part["position"].tolist(), strict=True))
        labelled = np.array([key in truth for key in keys], dtype=bool)
        if not labelled.any():
            continue
        if "pixels" not in part:
            without_pixels += int(labelled.sum())
            continue
        labels = [truth[key] for key, known in zip(keys, labelled, strict=True) if known]
        chosen.append(
            {
                "images": part["pixels"][labelled],
                "labels": np.array(labels, dtype=np.int64),
                "time": part["time"][labelled].astype(np.float64),
                "request_id": part["request_id"][labelled].astype(REQUEST_ID_DTYPE),
                "position": part["position"][labelled].astype(np.int32),
            }
        )
        _check(f"{file.store}/{file.name}", chosen[-1])
    if not chosen:
        return empty_snapshot(), without_pixels
    rows = {name: np.concatenate([part[name] for part in chosen]) for name in COLUMNS}
    return rows, without_pixels


def combine(previous: dict, fresh: dict) -> tuple[dict[str, np.ndarray], int]:
    """The rows of both, in time order, without duplicates; and how many were dropped.

    A duplicate is a row whose (request id, position) came before, or whose
    image and true digit are byte for byte those of an earlier row (the same
    scan sent twice would otherwise count twice in training).
    """
    rows = {name: np.concatenate([previous[name], fresh[name]]) for name in COLUMNS}
    rows["labels"] = rows["labels"].astype(np.uint8)
    order = np.lexsort((rows["position"], rows["request_id"], rows["time"]))
    rows = {name: values[order] for name, values in rows.items()}
    seen_keys: set[tuple[str, int]] = set()
    seen_content: set[bytes] = set()
    keep = np.zeros(len(order), dtype=bool)
    for index in range(len(order)):
        key = (str(rows["request_id"][index]), int(rows["position"][index]))
        content = rows["images"][index].tobytes() + bytes([rows["labels"][index]])
        if key in seen_keys or content in seen_content:
            continue
        seen_keys.add(key)
        seen_content.add(content)
        keep[index] = True
    return {name: values[keep] for name, values in rows.items()}, int((~keep).sum())


def write_snapshot(path: Path, rows: dict[str, np.ndarray]) -> None:
    """Write the arrays as an .npz that is byte-identical for identical rows."""
    with atomic_path(path) as temporary, zipfile.ZipFile(temporary, "w") as archive:
        for name in COLUMNS:
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_EPOCH)
            entry.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(entry, "w", force_zip64=True) as stream:
                np.lib.format.write_array(stream, np.ascontiguousarray(rows[name]))


def dvc_add(path: Path) -> None:
    """Track `path` with DVC in the repository around the working directory."""
    completed = subprocess.run(
        [sys.executable, "-m", "dvc", "add", str(path)],
        capture_output=True,
        text=True,
    )
    if completed.returncode:
        lines = (completed.stderr + completed.stdout).strip().splitlines()
        errors = [line for line in lines if line.startswith("ERROR: ")] or lines or ["failed"]
        reason = errors[0].removeprefix("ERROR: ")
        raise SnapshotError(f"the snapshot is written, but `dvc add {path}` failed: {reason}")


def check_repository() -> None:
    if not Path(".dvc").is_dir():
        raise SnapshotError(
            f"no DVC repository in {Path.cwd()}: run the snapshot at the project's root"
        )


def snapshot(log_dir: Path | str, target: Path, track: bool = True) -> SnapshotSummary:
    """Snapshot the labelled traffic of `log_dir` into `target`, merged with what it held."""
    if track:
        check_repository()
    previous = load_snapshot(target)
    fresh, without_pixels = labelled_log_rows(log_dir)
    rows, duplicates = combine(previous, fresh)
    new = len(rows["labels"]) - len(previous["labels"])
    summary = SnapshotSummary(target, len(rows["labels"]), new, duplicates, without_pixels)
    if not len(rows["labels"]):
        return summary
    unchanged = target.exists() and all(
        np.array_equal(rows[name], previous[name]) for name in COLUMNS
    )
    if not unchanged:
        write_snapshot(target, rows)
    if track and not (unchanged and target.with_name(target.name + ".dvc").exists()):
        dvc_add(target)
    return summary


def _check(source: str, arrays: dict[str, np.ndarray]) -> None:
    try:
        check_split(source, arrays["images"], arrays["labels"], None)
    except DataError as error:
        raise SnapshotError(str(error)) from None
    lengths = {len(values) for values in arrays.values()}
    if len(lengths) != 1:
        raise SnapshotError(f"{source}: the arrays have different lengths {sorted(lengths)}")
