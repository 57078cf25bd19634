"""Ground truth that arrives later, in bulk: a CSV of true digits joined to the inference log.

The file has a header and one row per image: `request_id,position,digit`
(position 0 is a request's first image). Every row is checked before any is
recorded; a bad file changes nothing.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from mnist_mlops.monitoring.inference_log import REQUEST_ID
from mnist_mlops.monitoring.log_files import RequestIndex, read_feedback, save_feedback

COLUMNS = ["request_id", "position", "digit"]
DIGIT = re.compile(r"[0-9]")
# Positions are stored as int16; no request holds more images than that.
MAX_POSITION = 32767
POSITION = re.compile(r"[0-9]{1,5}")


class FeedbackError(ValueError):
    """The feedback file cannot be read as true digits."""


@dataclass(frozen=True)
class FeedbackSummary:
    matched: int
    unknown: int
    duplicated: int

    def __str__(self) -> str:
        return (
            f"feedback: {self.matched} matched, {self.unknown} unknown, "
            f"{self.duplicated} duplicated"
        )


def read_labels(path: Path) -> list[tuple[str, int, int]]:
    """The rows of a feedback CSV, checked; a FeedbackError names the first bad line."""
    try:
        with open(path, newline="") as stream:
            reader = csv.reader(stream)
            header = next(reader, None)
            if header != COLUMNS:
                raise FeedbackError(f"{path}: the header must be {','.join(COLUMNS)}, got {header}")
            rows = [_row(path, number, fields) for number, fields in enumerate(reader, start=2)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise FeedbackError(f"{path}: {error}") from None
    if not rows:
        raise FeedbackError(f"{path}: no rows after the header")
    return rows


def _row(path: Path, number: int, fields: list[str]) -> tuple[str, int, int]:
    where = f"{path}:{number}"
    if len(fields) != len(COLUMNS):
        raise FeedbackError(f"{where}: expected {len(COLUMNS)} fields, got {len(fields)}")
    request_id, position, digit = (field.strip() for field in fields)
    if not REQUEST_ID.match(request_id):
        raise FeedbackError(f"{where}: {request_id!r} is not a request id")
    # ASCII digits only: str.isdigit() also takes "²" and "٣", which int() refuses or reads.
    if not POSITION.fullmatch(position):
        raise FeedbackError(
            f"{where}: the position must be a whole number in 0–{MAX_POSITION}, got {position!r}"
        )
    if not DIGIT.fullmatch(digit):
        raise FeedbackError(f"{where}: the digit must be in 0–9, got {digit!r}")
    if int(position) > MAX_POSITION:
        raise FeedbackError(
            f"{where}: the position must be a whole number in 0–{MAX_POSITION}, got {position!r}"
        )
    return request_id, int(position), int(digit)


def record(directory: Path | str, rows: list[tuple[str, int, int]]) -> FeedbackSummary:
    """Record the rows that match a logged image and have no true digit yet."""
    # One read of the folder for all the rows: an unknown id costs a dict lookup.
    images_of = RequestIndex(directory).all_requests()
    known = read_feedback(directory)
    fresh, unknown, duplicated = [], 0, 0
    seen = set(known)
    for request_id, position, digit in rows:
        images = images_of.get(request_id)
        if images is None or position >= images:
            unknown += 1
        elif (request_id, position) in seen:
            duplicated += 1
        else:
            seen.add((request_id, position))
            fresh.append((request_id, position, digit))
    if fresh:
        save_feedback(directory, fresh)
    return FeedbackSummary(len(fresh), unknown, duplicated)
