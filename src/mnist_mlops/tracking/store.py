"""The MLflow store: where runs are kept, and how a stage opens the experiment in it.

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

import errno
import fcntl
import os
import sqlite3
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

from mnist_mlops.paths import MLFLOW_ARTIFACTS_NAME, MLFLOW_DB_NAME, project_root
from mnist_mlops.tracking.runs import fail_abandoned_runs

if TYPE_CHECKING:
    from mnist_mlops.config import MlflowConfig

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
# How long a connection waits for another process's write to finish.
SQLITE_BUSY_TIMEOUT_SECONDS = 60
# A file system with less free space than this is reported as full.
FULL_BELOW_BYTES = 1 << 20
# A run's or an experiment's description, as the MLflow UI shows it.
NOTE_TAG = "mlflow.note.content"
EXPERIMENT_NOTE = """\
**Training runs of the MNIST classifier**, one per `dvc repro` or `dvc exp run`
(named after the DVC experiment). Each run holds the composed config as
parameters, loss and accuracy per epoch, the test accuracy and loss from the
evaluate stage, the confusion matrix, the test images it got most confidently
wrong (`mistakes.png`), and the machine's CPU, memory and disk while it
trained (System metrics).

**To compare runs**, open the view *training-runs* (the link that `make ui`
prints): each run's description, test and validation accuracy, and the
parameters that differ, best first. Tick two runs and press *Compare* for
their charts side by side. The registered model `mnist-classifier` has one
version per run; the one aliased `@champion` is served (`make serve`).
"""


def embedded_store() -> bool:
    return not os.environ.get(TRACKING_URI_ENV)


# Against a server that proxies artifacts (team mode, docs/team.md), every artifact
# goes through the server. With MLflow's presigned multipart transfers a client
# would reach the object store itself, and one that cannot waits minutes before it
# fails; a client holds no S3 keys and needs none.
ARTIFACTS_THROUGH_THE_SERVER = {
    "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
    "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false",
}


def missing_store() -> str:
    """Why a reading command has no store to read ("" when it has one), without making one."""
    database = project_root() / MLFLOW_DB_NAME
    if embedded_store() and not database.exists():
        return f"no MLflow store at {database}: run `make repro` first, or set {TRACKING_URI_ENV}"
    return ""


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the embedded SQLite store at the project root.

    Against a server, it also keeps every artifact transfer through the server
    (ARTIFACTS_THROUGH_THE_SERVER), unless the environment says otherwise.
    """
    if not embedded_store():
        for name, value in ARTIFACTS_THROUGH_THE_SERVER.items():
            os.environ.setdefault(name, value)
        return os.environ[TRACKING_URI_ENV]
    database = project_root() / MLFLOW_DB_NAME
    return f"sqlite:///{database}?timeout={SQLITE_BUSY_TIMEOUT_SECONDS}"


def full_places() -> list[str]:
    """Where this machine writes for the store and the stage, each with no space left."""
    root = project_root()
    places = {  # the embedded store's (absent with a tracking server)
        f"MLflow's artifact store {root / MLFLOW_ARTIFACTS_NAME}": root / MLFLOW_ARTIFACTS_NAME,
        f"MLflow's database {root / MLFLOW_DB_NAME}": root / MLFLOW_DB_NAME,
        "the working directory": Path.cwd(),
        "the temporary folder": tempfile.gettempdir(),
    }
    full = []
    for name, path in places.items():
        with suppress(OSError):
            stats = os.statvfs(path)
            if stats.f_bavail * stats.f_frsize < FULL_BELOW_BYTES:
                full.append(name)
    return full


def store_failure(error: BaseException) -> str | None:
    """One line for an error of the MLflow store (down, refusing, full …); None for any other."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        where = " and ".join(full_places()) or "a file system this stage writes to"
        return f"no space left: {where} is full ({error.strerror})"
    # Commands that never touch MLflow never import it (it costs a second).
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")
    if mlflow_exceptions is None or not isinstance(error, mlflow_exceptions.MlflowException):
        return None
    reason = error.message.strip().splitlines()[0]
    return f"MLflow at {tracking_uri()} failed: {reason}"


def report_store_failure(command: str, error: Exception, status: int) -> int:
    """For a command's `except Exception`: one line and `status` if the MLflow store failed.

    Any other error is raised again, with its traceback.
    """
    failure = store_failure(error)
    if failure is None:
        raise error
    print(f"mnist-mlops {command}: {failure}", file=sys.stderr)
    return status


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
    # MLflow records which environment variables a model's logging read by patching
    # os.environ for everyone while it logs; the stage's background threads (its run
    # log, the system metrics) read the environment meanwhile, and MLflow's iteration
    # over the set they grow then fails ("Set changed size during iteration", seen on a
    # busy machine). The list only feeds Databricks' serving tips.
    os.environ.setdefault("MLFLOW_RECORD_ENV_VARS_IN_MODEL_LOGGING", "false")
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
        try:
            experiment_id = mlflow.create_experiment(
                name, artifact_location=artifact_location, tags={NOTE_TAG: EXPERIMENT_NOTE}
            )
        except MlflowException:
            # Another process (on a shared server) created it after our lookup.
            experiment_id = mlflow.get_experiment_by_name(name).experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id
