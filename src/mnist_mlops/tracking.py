"""MLflow tracking: where runs are stored, how a stage opens one, what every run records.

By default runs go to an embedded store at the project root: SQLite in
`mlflow.db`, artifacts in `mlartifacts/`. The root comes from `project_root()`,
so experiments that DVC runs in temporary copies land in the same store.
MLFLOW_TRACKING_URI, when set, wins (for example a tracking server).

Queued experiments (`dvc queue start -j 2`) write to the embedded store from
several processes at once. SQLite copes when the database is in WAL mode
(readers never block the writer), connections wait for a busy database
instead of failing at once, and only one process creates or migrates the
schema: `use_experiment` sees to all three.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from mnist_mlops.paths import MLFLOW_ARTIFACTS_NAME, MLFLOW_DB_NAME, project_root

if TYPE_CHECKING:
    import mlflow

    from mnist_mlops.config import MlflowConfig

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
# How long a connection waits for another process's write to finish.
SQLITE_BUSY_TIMEOUT_SECONDS = 60


def embedded_store() -> bool:
    return not os.environ.get(TRACKING_URI_ENV)


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the embedded SQLite store at the project root."""
    if not embedded_store():
        return os.environ[TRACKING_URI_ENV]
    database = project_root() / MLFLOW_DB_NAME
    return f"sqlite:///{database}?timeout={SQLITE_BUSY_TIMEOUT_SECONDS}"


def store_failure(error: BaseException) -> str | None:
    """One line for an error of the MLflow store (down, refusing, …); None for any other error."""
    # Commands that never touch MLflow never import it (it costs a second).
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")
    if mlflow_exceptions is None or not isinstance(error, mlflow_exceptions.MlflowException):
        return None
    reason = error.message.strip().splitlines()[0]
    return f"MLflow at {tracking_uri()} failed: {reason}"


@contextmanager
def project_lock(name: str) -> Iterator[None]:
    """An exclusive lock, shared by every process working on this project on this machine."""
    lock_file = project_root() / f"{MLFLOW_DB_NAME}.{name}.lock"
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _use_wal_mode() -> None:
    database = project_root() / MLFLOW_DB_NAME
    with sqlite3.connect(database, timeout=SQLITE_BUSY_TIMEOUT_SECONDS) as connection:
        connection.execute("PRAGMA journal_mode=WAL")


def use_experiment(config: MlflowConfig) -> str:
    """Point MLflow at the tracking store and the configured experiment, creating them if needed.

    Against a tracking server, requests are retried `http_retries` times and
    time out after `http_timeout_seconds`, so a server that is down fails the
    stage within seconds, not minutes.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(config.http_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(config.http_timeout_seconds))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    # Stages move a few small artifacts; progress bars for them only clutter the log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    name = config.experiment_name
    # Read before set_tracking_uri, which exports MLFLOW_TRACKING_URI itself.
    embedded = embedded_store()
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if not embedded:
        experiment_id = _get_or_create_experiment(name, artifact_location=None)
        fail_abandoned_runs(experiment_id)
        return experiment_id
    # Two processes creating the schema of one new database at once collide
    # ("duplicate column name"): the first creates it, the others wait.
    with project_lock("setup"):
        experiment_id = _get_or_create_experiment(
            name, artifact_location=(project_root() / MLFLOW_ARTIFACTS_NAME).as_uri()
        )
        _use_wal_mode()
    fail_abandoned_runs(experiment_id)
    return experiment_id


def _get_or_create_experiment(name: str, artifact_location: str | None) -> str:
    import mlflow
    from mlflow.exceptions import MlflowException

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        # Without an explicit location MLflow would put the embedded store's
        # artifacts in ./mlruns, relative to wherever the stage happens to run.
        from mnist_mlops.ui import EXPERIMENT_NOTE, NOTE_TAG

        try:
            experiment_id = mlflow.create_experiment(
                name, artifact_location=artifact_location, tags={NOTE_TAG: EXPERIMENT_NOTE}
            )
        except MlflowException:
            # Another process (on a shared server) created it after our lookup.
            experiment_id = mlflow.get_experiment_by_name(name).experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


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
