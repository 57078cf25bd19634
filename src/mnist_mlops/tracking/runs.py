"""How a stage's MLflow run starts, ends and records where it came from.

A run always ends (FINISHED, FAILED or KILLED), also when SIGTERM stops the
stage; a run whose process died outright is marked FAILED by the next stage
on the same host; every run is tagged with its git commit, data digest and
DVC experiment.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import mlflow

# A signal that arrives inside `termination_deferred()` waits for the block's end.
_deferral = {"depth": 0, "pending": ""}


def _terminate(signum: int, _frame: object) -> None:
    name = signal.Signals(signum).name
    if _deferral["depth"]:
        _deferral["pending"] = name
        return
    raise KeyboardInterrupt(f"stopped by signal {name}")


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Inside the block SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so cleanup runs."""
    previous_handler = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


@contextmanager
def termination_deferred() -> Iterator[None]:
    """Let a write to the store finish before SIGTERM stops the stage.

    Interrupted half-way, a SQLite write can leave its transaction open, and
    the run's end then waits on it: MLflow's system-metrics thread cannot log
    its last samples, and ending the run waits for that thread.
    """
    _deferral["depth"] += 1
    try:
        yield
    finally:
        _deferral["depth"] -= 1
    if not _deferral["depth"] and _deferral["pending"]:
        name, _deferral["pending"] = _deferral["pending"], ""
        raise KeyboardInterrupt(f"stopped by signal {name}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_abandoned_runs(experiment_id: str) -> list[str]:
    """Mark FAILED the RUNNING runs whose process on this host is gone; return their ids.

    A run whose process was killed outright (SIGKILL, a crash) or that lost its
    tracking server before it could end is left RUNNING by MLflow. Every run
    records its host and process id, so the next stage on the same host can
    tell such a run from one that is still going.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    host = socket.gethostname()
    abandoned = []
    for run in client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.host = '{host}'"
    ):
        pid = run.data.tags.get("pid", "")
        if pid.isdigit() and not _process_alive(int(pid)):
            client.set_tag(run.info.run_id, "ended_by", "cleanup: its process had gone")
            client.set_terminated(run.info.run_id, status="FAILED")
            abandoned.append(run.info.run_id)
    if abandoned:
        print(f"marked FAILED {len(abandoned)} abandoned run(s): {', '.join(abandoned)}")
    return abandoned


@contextmanager
def active_run(**start_run_arguments) -> Iterator[mlflow.ActiveRun]:
    """Start (or resume) a run and always end it: FINISHED, FAILED, or KILLED when interrupted.

    MLflow's own context manager marks an interrupted run FAILED, and a plain
    SIGTERM (what DVC and process managers send) would end the process without
    ending the run at all, leaving it RUNNING forever.
    """
    import mlflow

    previous_handler = signal.signal(signal.SIGTERM, _terminate)
    run = mlflow.start_run(**start_run_arguments)
    status = "FAILED"
    try:
        mlflow.set_tags({"host": socket.gethostname(), "pid": str(os.getpid())})
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        try:
            mlflow.end_run(status)
        except Exception as error:  # the store itself may be what failed
            print(
                f"could not mark MLflow run {run.info.run_id} {status} ({type(error).__name__}); "
                "the next stage on this host will mark it FAILED",
                file=sys.stderr,
            )
            if status == "FINISHED":
                raise


def log_dataset(dataset: mlflow.data.Dataset, context: str, attempts: int = 3) -> None:
    """Record `dataset` as an input of the active run.

    MLflow's stores look a dataset up by name and digest and insert it when it
    is missing: two steps, not one. Two runs logging the same new dataset at
    once (a queued grid, two teammates on one server) can both miss it, and the
    slower insert then breaks the unique key. That attempt changes nothing, and
    the next one finds the dataset the other run inserted.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    for attempt in range(1, attempts + 1):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except MlflowException:
            if attempt == attempts:
                raise
            time.sleep(0.5 * attempt)


def _git(*arguments: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", *arguments], capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()


def provenance_tags(data_digest: str) -> dict[str, str]:
    """Tags that lead from a run back to its code, its DVC experiment and its data."""
    tags = {"data.digest": data_digest}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["git.commit"] = commit
        tags["mlflow.source.git.commit"] = commit
        changes = _git("status", "--porcelain", "--untracked-files=no")
        tags["git.dirty"] = str(bool(changes)).lower()
    for variable, tag in (
        ("DVC_EXP_NAME", "dvc.exp_name"),
        ("DVC_EXP_BASELINE_REV", "dvc.baseline_rev"),
        ("DVC_STAGE", "dvc.stage"),
    ):
        if os.environ.get(variable):
            tags[tag] = os.environ[variable]
    return tags
