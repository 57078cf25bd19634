"""Optuna's side of `mnist-mlops tune`: the storage, the sampler, the pruner, joining a study.

The embedded default storage is Optuna's RDBStorage on SQLite (`optuna.db`
beside `mlflow.db`). RDBStorage, not JournalStorage, because only RDBStorage
keeps trial heartbeats, which is how a trial whose worker was killed outright
is found and retried. SQLite in WAL mode, with connections that wait for a
busy database, is safe for several worker processes on one machine (not on a
network file system). Workers on several machines share a PostgreSQL
database instead: `--storage postgresql://…` or MNIST_OPTUNA_STORAGE.
"""

from __future__ import annotations

import sqlite3
import time
import urllib.parse
import warnings
from collections.abc import Callable

from mnist_mlops.paths import OPTUNA_DB_NAME, project_root
from mnist_mlops.tracking.store import project_lock

STORAGE_ENV = "MNIST_OPTUNA_STORAGE"
SQLITE_BUSY_TIMEOUT_SECONDS = 60
POSTGRES_CONNECT_TIMEOUT_SECONDS = 5
PRUNERS = ("median", "hyperband", "none")


class StudyError(RuntimeError):
    """The study or its storage cannot be used as asked."""


def default_storage() -> str:
    return f"sqlite:///{project_root() / OPTUNA_DB_NAME}"


def masked(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def open_storage(
    url: str,
    heartbeat_seconds: int,
    grace_seconds: int,
    on_stale: Callable | None,
    outage_seconds: float = 0,
):
    """Connect to the storage (creating its tables once); a bad one fails with one line.

    Once connected, its calls wait out an outage of up to `outage_seconds`
    (tuning/patient_storage.py).
    """
    import optuna
    import sqlalchemy.exc

    from mnist_mlops.tuning.patient_storage import patient_storage_class

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    given, engine_kwargs, database = url, {}, None
    if url.startswith("sqlite:///"):
        database = url.removeprefix("sqlite:///")
        engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_SECONDS}}
    elif url.startswith("postgresql"):
        # SQLAlchemy 2.1 would pick the psycopg 3 driver; the lock file has psycopg2.
        url = url.replace("postgresql://", "postgresql+psycopg2://", 1)
        engine_kwargs = {
            "connect_args": {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_SECONDS},
            "pool_pre_ping": True,
        }

    def connect():
        return patient_storage_class(outage_seconds)(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_seconds,
            grace_period=grace_seconds,
            heartbeat_stale_trial_callback=on_stale,
        )

    try:
        if database is None:
            return connect()
        # Two workers creating the tables of a new database at once collide.
        with project_lock("optuna-setup"):
            with sqlite3.connect(database, timeout=SQLITE_BUSY_TIMEOUT_SECONDS) as connection:
                connection.execute("PRAGMA journal_mode=WAL")
            return connect()
    except (
        sqlalchemy.exc.SQLAlchemyError,
        sqlite3.Error,
        optuna.exceptions.StorageInternalError,
        ImportError,
        ValueError,
    ) as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise StudyError(f"cannot use the Optuna storage {masked(given)}: {reason}") from None


def make_sampler(seed: int, startup_trials: int):
    """Seeded TPE whose draws for trial n depend on (seed, n) alone.

    One seeded sampler per worker would make every worker draw the same
    random start-up trials; seeding by trial number keeps a one-worker study
    reproducible and lets parallel workers draw different trials. With
    `constant_liar`, TPE treats running trials as done badly, so parallel
    workers do not all chase the same region.
    """
    import optuna

    class TrialSeededTPESampler(optuna.samplers.BaseSampler):
        def __init__(self) -> None:
            self._tpe = self._for_trial(0)

        @staticmethod
        def _for_trial(number: int):
            return optuna.samplers.TPESampler(
                seed=seed + number, n_startup_trials=startup_trials, constant_liar=True
            )

        def __repr__(self) -> str:
            return f"TPESampler(seed={seed} + trial number, n_startup_trials={startup_trials})"

        def before_trial(self, study, trial) -> None:
            self._tpe = self._for_trial(trial.number)
            self._tpe.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self._tpe.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self._tpe.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self._tpe.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values) -> None:
            self._tpe.after_trial(study, trial, state, values)

    return TrialSeededTPESampler()


def make_pruner(name: str, prune_after: int, max_epochs: int):
    """The median rule, Hyperband over epochs, or none; epochs are the steps."""
    import optuna

    if name == "median":
        # The first epoch says little; a trial is judged from its second on.
        return optuna.pruners.MedianPruner(n_startup_trials=prune_after, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs)
    return optuna.pruners.NopPruner()


def describe_pruner(pruner) -> str:
    settings = {
        key.lstrip("_"): value
        for key, value in vars(pruner).items()
        if isinstance(value, (int, float, str)) and not key.startswith("__")
    }
    inside = ", ".join(f"{key}={value}" for key, value in sorted(settings.items()))
    return f"{type(pruner).__name__}({inside})"


def trials_in(study, *states: str) -> list:
    """The study's trials in any of `states` (names of optuna.trial.TrialState)."""
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=tuple(TrialState[state] for state in states))


def load_study(storage, name: str):
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise StudyError(f"no study {name!r} in the storage yet") from None


def join_study(
    storage,
    name: str,
    sampler,
    pruner,
    attributes: dict,
    create_parent: Callable[[], str],
    discard_parent: Callable[[str], None],
    parent_attr: str,
    wait_seconds: float = 30.0,
):
    """Load the study, or create it with its MLflow parent run; return (study, parent run id).

    Creating a study is atomic in the storage (its name is unique), so of two
    workers that start at once exactly one creates it; the other discards the
    parent run it made and nests under the winner's, read from the study.
    """
    import optuna

    arguments = {"study_name": name, "storage": storage, "sampler": sampler, "pruner": pruner}
    try:
        study = optuna.load_study(**arguments)
    except KeyError:
        parent = create_parent()
        try:
            study = optuna.create_study(direction="maximize", **arguments)
        except optuna.exceptions.DuplicatedStudyError:
            discard_parent(parent)
            study = optuna.load_study(**arguments)
        else:
            for key, value in {**attributes, parent_attr: parent}.items():
                study.set_user_attr(key, value)
            return study, parent
    for key, value in attributes.items():
        recorded = study.user_attrs.get(key, value)
        if recorded != value:
            raise StudyError(
                f"study {name} was started with {key} {recorded!r}, not {value!r}; "
                "give the same, or another --study"
            )
    deadline = time.monotonic() + wait_seconds
    while parent_attr not in study.user_attrs:
        if time.monotonic() > deadline:
            # Its creator stopped between creating it and recording the run.
            parent = create_parent()
            study.set_user_attr(parent_attr, parent)
            return study, parent
        time.sleep(0.5)
        study = optuna.load_study(**arguments)
    return study, study.user_attrs[parent_attr]
