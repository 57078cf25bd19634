"""The monitoring wing's commands: `feedback`, true digits from a CSV into the inference log."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mnist_mlops.paths import inference_log_dir


def add_commands(commands: argparse._SubParsersAction) -> None:
    feedback = commands.add_parser(
        "feedback", help="record true digits from a CSV (request_id,position,digit)"
    )
    feedback.add_argument("labels", type=Path, metavar="CSV", help="the true digits")
    feedback.add_argument(
        "--log-dir",
        type=Path,
        default=inference_log_dir(),
        help="the inference log's folder (%(default)s; MNIST_INFERENCE_LOG_DIR sets the default)",
    )
    feedback.set_defaults(run=record_feedback)


def record_feedback(arguments: argparse.Namespace) -> int:
    from mnist_mlops.monitoring.feedback import FeedbackError, read_labels, record

    try:
        rows = read_labels(arguments.labels)
    except FeedbackError as error:
        print(f"mnist-mlops feedback: {error}", file=sys.stderr)
        return 2
    if not arguments.log_dir.is_dir():
        print(f"mnist-mlops feedback: no inference log at {arguments.log_dir}", file=sys.stderr)
        return 2
    print(record(arguments.log_dir, rows))
    return 0
