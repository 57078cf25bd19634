"""Reading the inference log: which files count, their rows, the feedback, who asked what.

A merged segment (`KIND-WRITER-FIRST-LAST.npz`) stands for the parts it
covers, so a writer killed between writing a segment and removing its parts
duplicates nothing. Files are read with numpy's loader, never unpickled.
Every function takes the log's place: a folder, an `s3://` URL or a store
(log_store.py).
"""

from __future__ import annotations

import io
import os
import re
import secrets
import socket
import time
from pathlib import Path

import numpy as np

from mnist_mlops.monitoring.features import image_features
from mnist_mlops.monitoring.log_store import FolderStore, LogFile, S3Store, store_of
from mnist_mlops.monitoring.segments import merge_folder_parts

ROWS, FEEDBACK = "rows", "feedback"
FILE_NAME = re.compile(r"^(rows|feedback)-([A-Za-z0-9_.]+)-(\d{8})(?:-(\d{8}))?\.npz$")

Where = str | Path | FolderStore | S3Store


def all_log_files(where: Where) -> list[tuple[LogFile, re.Match]]:
    return [
        (file, match) for file in store_of(where).files() if (match := FILE_NAME.match(file.name))
    ]


def log_files(where: Where, kind: str) -> list[LogFile]:
    """The files of one kind a reader takes: merged segments, and the parts none of them covers."""
    return taken_of(all_log_files(where), kind)


def taken_of(listing: list[tuple[LogFile, re.Match]], kind: str) -> list[LogFile]:
    """`log_files` of one listing: a part counts as covered only by a segment listed with it."""
    files = [(file, match) for file, match in listing if match.group(1) == kind]
    covered: dict[str, list[tuple[int, int]]] = {}
    for _, match in files:
        if match.group(4):
            covered.setdefault(match.group(2), []).append(
                (int(match.group(3)), int(match.group(4)))
            )
    chosen = []
    for file, match in files:
        if not match.group(4):
            sequence = int(match.group(3))
            ranges = covered.get(match.group(2), [])
            if any(first <= sequence <= last for first, last in ranges):
                continue
        chosen.append(file)
    return sorted(chosen, key=lambda file: file.name)


def writer_id() -> str:
    """A writer's id, unique even for two writers of one process in the same millisecond.

    `save_feedback` is a writer of its own per call: without the random part,
    two calls within a millisecond wrote the same file name, and the second
    replaced the first.
    """
    host = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"
    return f"{host}.{os.getpid()}.{time.time_ns() // 1_000_000}.{secrets.token_hex(4)}"


def to_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    stream = io.BytesIO()
    np.savez(stream, **arrays)
    return stream.getvalue()


def load(file: LogFile | Path) -> dict[str, np.ndarray]:
    """One log file's arrays (never unpickled)."""
    data = file.read_bytes() if isinstance(file, Path) else file.read()
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
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


def remove_expired(where: Where, retention_hours: float) -> int:
    """Remove log files (and writers' marks) older than the retention; return how many went."""
    store = store_of(where)
    cutoff = time.time() - retention_hours * 3600
    expired = [
        file
        for file in store.files()
        if (FILE_NAME.match(file.name) or file.name.startswith(MARK)) and file.mtime < cutoff
    ]
    for file in expired:
        store.remove(file.name)
    return len(expired)


# How far each writer of a log in a folder has written. After every flush a
# writer renames `written-WRITER` into place: the time it took its queue. A
# request's rows are queued before its answer leaves, so a request answered
# before a moment is in the log once every writer's mark is past it; a writer
# whose mark stopped well before it (stopped or killed) wrote all it ever
# will. A log on an object store has no marks: its files reach the store
# later than they are written.
MARK = "written-"


def mark_written(folder: Path, writer: str, taken: float) -> None:
    FolderStore(folder).write(f"{MARK}{writer}", f"{taken:.6f}".encode())


def written_past(folder: Path, moment: float, silent_seconds: float) -> bool:
    """True when every writer of the folder still writing has written what it had at `moment`."""
    marks = 0
    for file in FolderStore(folder).files():
        if not file.name.startswith(MARK) or file.mtime < moment - silent_seconds:
            continue
        try:
            taken = float(file.read())
        except (OSError, ValueError):
            return False
        if taken < moment:
            return False
        marks += 1
    return marks > 0


def merge_parts(where: Where, writer: str, kind: str, segment_bytes: int, seconds: float) -> None:
    """Merge a writer's parts into one segment once they are big or old enough.

    The segment is written before its parts are removed; a reader takes it
    instead of any part it covers, so a crash in between duplicates nothing.
    A part a segment already covers (one shipped again from a shared spool
    after its merge) is removed, never merged twice.
    """
    store = store_of(where)
    # One listing for both questions: a part another process ships between two
    # listings is in the second and not the first, looks covered, and would be
    # removed unread.
    listing = all_log_files(store)
    taken = {file.name for file in taken_of(listing, kind)}
    parts = []
    for file, match in listing:
        if match.group(1) == kind and match.group(2) == writer and not match.group(4):
            if file.name in taken:
                parts.append((int(match.group(3)), file))
            else:
                store.remove(file.name)
    parts.sort(key=lambda part: part[0])
    if len(parts) < 2:
        return
    size = sum(file.size for _, file in parts)
    age = time.time() - min(file.mtime for _, file in parts)
    if size < segment_bytes and age < seconds:
        return
    name = f"{kind}-{writer}-{parts[0][0]:08d}-{parts[-1][0]:08d}.npz"
    if isinstance(store, FolderStore):
        merge_folder_parts([file.path for _, file in parts], store.root / name)
    else:
        store.write(name, to_bytes(concatenate([load(file) for _, file in parts])))
    for _, file in parts:
        store.remove(file.name)


def save_feedback(where: Where, rows: list[tuple[str, int, int]]) -> str:
    """Write (request id, position, digit) rows as one feedback file of a writer of its own."""
    arrays = {
        "request_id": np.array([request_id for request_id, _, _ in rows]),
        "position": np.array([position for _, position, _ in rows], dtype=np.int16),
        "time": np.full(len(rows), time.time()),
        "digit": np.array([digit for _, _, digit in rows], dtype=np.int8),
    }
    name = f"{FEEDBACK}-{writer_id()}-{1:08d}.npz"
    store_of(where).write(name, to_bytes(arrays))
    return name


def feedback_arrays(feedback: list[tuple]) -> dict[str, np.ndarray]:
    """A feedback file's arrays from the writer's queued (kind, request id, time, digits)."""
    return {
        "request_id": np.array([item[1] for item in feedback for _ in item[3]]),
        "position": np.concatenate([np.arange(len(item[3]), dtype=np.int16) for item in feedback]),
        "time": np.concatenate([np.full(len(item[3]), item[2]) for item in feedback]),
        "digit": np.concatenate([np.asarray(item[3], dtype=np.int8) for item in feedback]),
    }


def with_features(part: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A rows file's arrays with the images' features, computed here when it kept the pixels.

    A server that keeps the pixels leaves the features to the reader: they
    were three quarters of its log writer's work, on the cores that answer.
    """
    if "features" in part or "pixels" not in part:
        return part
    return {**part, "features": image_features(part["pixels"])}


def load_all(where: Where, kind: str) -> list[tuple[LogFile, dict[str, np.ndarray]]]:
    """Every file a reader takes, loaded; listed again if a writer merged some meanwhile."""
    store = store_of(where)
    for attempt in range(3):
        try:
            return [(file, load(file)) for file in log_files(store, kind)]
        except FileNotFoundError:
            if attempt == 2:
                raise
    return []


def read_rows(where: Where) -> dict[str, np.ndarray]:
    """Every logged row, oldest first, with per-row model name and version."""
    rows = concatenate([with_features(part) for _, part in load_all(where, ROWS)])
    if not rows:
        return {}
    order = np.argsort(rows["time"], kind="stable")
    return {name: values[order] for name, values in rows.items()}


def read_feedback(where: Where) -> dict[tuple[str, int], int]:
    """The true digit of each (request id, position); the first one recorded wins."""
    feedback = concatenate([part for _, part in load_all(where, FEEDBACK)])
    truth: dict[tuple[str, int], int] = {}
    if not feedback:
        return truth
    for index in np.argsort(feedback["time"], kind="stable"):
        key = (str(feedback["request_id"][index]), int(feedback["position"][index]))
        truth.setdefault(key, int(feedback["digit"][index]))
    return truth


class RequestIndex:
    """How many images each logged request had, read from the log as new files appear."""

    def __init__(self, where: Where) -> None:
        self.store = store_of(where)
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
        present = {file.name: file for file in log_files(self.store, ROWS)}
        for name in set(self._files) - set(present):
            del self._files[name]
        for name, file in present.items():
            if name in self._files:
                continue
            try:
                with np.load(io.BytesIO(file.read()), allow_pickle=False) as archive:
                    request_ids, positions = archive["request_id"], archive["position"]
            except (OSError, ValueError, KeyError):
                continue
            counts: dict[str, int] = {}
            for request_id, position in zip(request_ids.tolist(), positions.tolist(), strict=True):
                counts[request_id] = max(counts.get(request_id, 0), position + 1)
            self._files[name] = counts
