"""The tuning wing's command: `tune`, an Optuna study whose trials are nested MLflow runs."""

from __future__ import annotations

import argparse
import sys

from mnist_mlops.tuning import studies


def add_commands(commands: argparse._SubParsersAction) -> None:
    tune = commands.add_parser(
        "tune", help="search hyperparameters with Optuna; every trial a nested MLflow run"
    )
    tune.add_argument("--study", required=True, help="the study's name; workers share it")
    tune.add_argument("--trials", type=int, default=20, help="finished trials in all")
    tune.add_argument("--search", default="mlp", help="a search space of conf/search")
    tune.add_argument("--timeout", type=float, help="start no trial after this many seconds")
    tune.add_argument(
        "--pruner", choices=studies.PRUNERS, default="median", help="which trials to stop early"
    )
    tune.add_argument("--seed", type=int, default=42, help="the sampler's seed")
    tune.add_argument(
        "--startup-trials",
        type=int,
        default=5,
        help="random trials before TPE models the results",
    )
    tune.add_argument(
        "--prune-after",
        type=int,
        default=5,
        help="complete trials before the median rule cuts any",
    )
    tune.add_argument(
        "--storage",
        help=f"sqlite:///… or postgresql://… ({studies.STORAGE_ENV}; default optuna.db)",
    )
    tune.add_argument(
        "--heartbeat", type=int, default=10, help="seconds between a trial's heartbeats"
    )
    tune.add_argument(
        "--grace-period",
        type=int,
        help="seconds without a heartbeat before a trial is failed and retried (3 heartbeats)",
    )
    tune.add_argument(
        "--storage-outage",
        type=float,
        default=120,
        help="seconds a trial waits for a storage that went away before its worker fails",
    )
    tune.add_argument(
        "--export", action="store_true", help="only write the best trial's experiment preset"
    )
    tune.add_argument(
        "overrides",
        nargs="*",
        metavar="OVERRIDE",
        help="Hydra overrides for every trial (train.seed=1) or the space "
        "(search.train.epochs.high=8)",
    )
    tune.set_defaults(run=run)


def run(arguments: argparse.Namespace) -> int:
    from mnist_mlops.config import ConfigError
    from mnist_mlops.tracking.store import report_store_failure
    from mnist_mlops.tuning.patient_storage import StorageAway
    from mnist_mlops.tuning.search import SearchError
    from mnist_mlops.tuning.tune import tune

    try:
        return tune(arguments)
    except (SearchError, studies.StudyError, ConfigError) as error:
        print(f"mnist-mlops tune: {error}", file=sys.stderr)
        return 2
    except StorageAway as error:
        print(f"mnist-mlops tune: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interruption:
        print(
            f"mnist-mlops tune: interrupted {interruption}; the same command resumes the study",
            file=sys.stderr,
        )
        return 130
    except Exception as error:
        return report_store_failure("tune", error, 1)
