"""Reading the inference log: which files count, their rows, the feedback, who asked what.

A merged segment (`KIND-WRITER-FIRST-LAST.npz`) stands for the parts it
covers, so a writer killed between writing a segment and removing its parts
duplicates nothing. Files are read with numpy's loader, never unpickled.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np

from mnist_mlops.monitoring.features import image_features

ROWS, FEEDBACK = "rows", "feedback"
FILE_NAME = re.compile(r"^(rows|feedback)-([A-Za-z0-9_.]+)-(\d{8})(?:-(\d{8}))?\.npz$")


def all_log_files(directory: Path) -> list[tuple[Path, re.Match]]:
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    return [
        (Path(entry.path), match) for entry in entries if (match := FILE_NAME.match(entry.name))
    ]


def log_files(directory: Path, kind: str) -> list[Path]:
    """The files of one kind a reader takes: merged segments, and the parts none of them covers."""
    files = [(path, match) for path, match in all_log_files(directory) if match.group(1) == kind]
    covered: dict[str, list[tuple[int, int]]] = {}
    for _, match in files:
        if match.group(4):
            covered.setdefault(match.group(2), []).append(
                (int(match.group(3)), int(match.group(4)))
            )
    chosen = []
    for path, match in files:
        if not match.group(4):
            sequence = int(match.group(3))
            ranges = covered.get(match.group(2), [])
            if any(first <= sequence <= last for first, last in ranges):
                continue
        chosen.append(path)
    return sorted(chosen)


def load(path: Path) -> dict[str, np.ndarray]:
    """One log file's arrays (never unpickled)."""
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def concatenate(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Row arrays joined; a file's scalars (the model's name and version) become one per row."""
    if not parts:
        return {}

    def per_row(part: dict[str, np.ndarray], name: str) -> np.ndarray:
        values = part[name]
        return np.full(len(part["request_id"]), values) if values.ndim == 0 else values

    # Files written with pixels on and off mix: keep what all of them have.
    shared = [name for name in parts[0] if all(name in part for part in parts)]
    return {name: np.concatenate([per_row(part, name) for part in parts]) for name in shared}


def remove_expired(directory: Path, retention_hours: float) -> int:
    """Remove log files older than the retention; return how many went."""
    cutoff = time.time() - retention_hours * 3600
    removed = 0
    for path, _match in all_log_files(directory):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def with_features(part: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A rows file's arrays with the images' features, computed here when it kept the pixels.

    A server that keeps the pixels leaves the features to the reader: they
    were three quarters of its log writer's work, on the cores that answer.
    """
    if "features" in part or "pixels" not in part:
        return part
    return {**part, "features": image_features(part["pixels"])}


def read_rows(directory: Path) -> dict[str, np.ndarray]:
    """Every logged row in the folder, oldest first, with per-row model name and version."""
    rows = concatenate([with_features(load(path)) for path in log_files(directory, ROWS)])
    if not rows:
        return {}
    order = np.argsort(rows["time"], kind="stable")
    return {name: values[order] for name, values in rows.items()}


def read_feedback(directory: Path) -> dict[tuple[str, int], int]:
    """The true digit of each (request id, position); the first one recorded wins."""
    feedback = concatenate([load(path) for path in log_files(directory, FEEDBACK)])
    truth: dict[tuple[str, int], int] = {}
    if not feedback:
        return truth
    for index in np.argsort(feedback["time"], kind="stable"):
        key = (str(feedback["request_id"][index]), int(feedback["position"][index]))
        truth.setdefault(key, int(feedback["digit"][index]))
    return truth


class RequestIndex:
    """How many images each logged request had, read from the folder as new files appear."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files: dict[str, dict[str, int]] = {}

    def images_of(self, request_id: str) -> int | None:
        for counts in self._files.values():
            if request_id in counts:
                return counts[request_id]
        self.refresh()
        for counts in self._files.values():
            if request_id in counts:
                return counts[request_id]
        return None

    def all_requests(self) -> dict[str, int]:
        """Every logged request's image count, the folder read once."""
        self.refresh()
        merged: dict[str, int] = {}
        for counts in self._files.values():
            merged.update(counts)
        return merged

    def refresh(self) -> None:
        present = {path.name: path for path in log_files(self.directory, ROWS)}
        for name in set(self._files) - set(present):
            del self._files[name]
        for name, path in present.items():
            if name in self._files:
                continue
            try:
                with np.load(path, allow_pickle=False) as archive:
                    request_ids, positions = archive["request_id"], archive["position"]
            except (OSError, ValueError, KeyError):
                continue
            counts: dict[str, int] = {}
            for request_id, position in zip(request_ids.tolist(), positions.tolist(), strict=True):
                counts[request_id] = max(counts.get(request_id, 0), position + 1)
            self._files[name] = counts
