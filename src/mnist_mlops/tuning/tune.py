"""`mnist-mlops tune`: an Optuna study over a search space of conf/search/, on data/processed.

Run the same command in more processes, or on more machines that share the
storage, the MLflow server and the processed data, and they share one study:
`--trials` is the budget of finished (complete or pruned) trials of the whole
study. Every trial trains on the training split and is scored on
validation accuracy; the test set stays with the pipeline's evaluate stage.
The best trial becomes conf/experiment/STUDY.yaml, which
`dvc exp run -S experiment=STUDY` runs through the whole pipeline.
"""

from __future__ import annotations

import argparse
import os
import re
import time

from mnist_mlops.paths import PROCESSED_MANIFEST, processed_split_file
from mnist_mlops.tracking.runs import sigterm_interrupts
from mnist_mlops.tracking.store import use_experiment
from mnist_mlops.tuning import studies
from mnist_mlops.tuning.studies import trials_in

STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def tune(arguments: argparse.Namespace) -> int:
    import optuna

    from mnist_mlops.config import validate
    from mnist_mlops.tuning import search, study_runs
    from mnist_mlops.tuning.trial import Objective

    if not STUDY_NAME.match(arguments.study):
        raise studies.StudyError(f"study name {arguments.study!r}: use letters, digits, - and _")
    if min(arguments.trials, arguments.heartbeat) <= 0:
        raise studies.StudyError("--trials and --heartbeat must be positive")
    if min(arguments.startup_trials, arguments.prune_after, arguments.storage_outage) < 0:
        raise studies.StudyError(
            "--startup-trials, --prune-after and --storage-outage must be 0 or more"
        )
    storage_url = (
        arguments.storage or os.environ.get(studies.STORAGE_ENV) or studies.default_storage()
    )
    grace = arguments.grace_period or 3 * arguments.heartbeat
    if arguments.export:
        storage = studies.open_storage(storage_url, arguments.heartbeat, grace, None)
        print(export(studies.load_study(storage, arguments.study)))
        return 0
    space = search.load(arguments.search, arguments.overrides)
    base = validate(search.compose(space.overrides))
    missing = [path for path in _processed_files() if not path.exists()]
    if missing:
        raise studies.StudyError(
            f"{missing[0]} is missing: make the processed data with `dvc repro preprocess` "
            "(or `dvc pull` on another machine)"
        )
    # Each trial gets one line of its own (Objective.report); Optuna's would repeat it,
    # with a traceback for a trial stopped by Ctrl-C.
    optuna.logging.set_verbosity(optuna.logging.ERROR)

    def on_stale(study, trial) -> None:
        print(f"tune: trial {trial.number}'s worker stopped beating; retrying its params")
        study_runs.fail_trial_run(trial)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)(study, trial)

    storage = studies.open_storage(
        storage_url, arguments.heartbeat, grace, on_stale, arguments.storage_outage
    )
    # After the storage: one that cannot be used fails in its one line before MLflow's
    # store is touched (a new store's first use logs its table creation).
    experiment_id = use_experiment(base.mlflow)
    max_epochs = max(
        [p.high for p in space.parameters if p.name == "train.epochs"] or [base.train.epochs]
    )
    sampler = studies.make_sampler(arguments.seed, arguments.startup_trials)
    pruner = studies.make_pruner(arguments.pruner, arguments.prune_after, max_epochs)

    digest = _data_digest()
    described = {
        "optuna.study": arguments.study,
        "optuna.search": space.name,
        "optuna.objective": study_runs.OBJECTIVE,
        "optuna.sampler": repr(sampler),
        "optuna.pruner": studies.describe_pruner(pruner),
        "optuna.storage": studies.masked(storage_url),
    }
    study, parent = studies.join_study(
        storage,
        arguments.study,
        sampler,
        pruner,
        {"search": space.name, "overrides": list(arguments.overrides)},
        create_parent=lambda: study_runs.create_parent(
            experiment_id, arguments.study, described, space.describe(), digest
        ),
        discard_parent=study_runs.discard_parent,
        parent_attr=study_runs.PARENT_RUN_ATTR,
    )
    print(
        f"tune: study {arguments.study} ({studies.masked(storage_url)}), MLflow parent run {parent}"
    )
    objective = Objective(space, arguments.trials, experiment_id, parent, digest)
    study_runs.set_parent_status(parent, "RUNNING")
    status = "FAILED"
    try:
        with sigterm_interrupts():
            work(study, arguments.trials, arguments.timeout, objective)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        # The parent run ends with the last worker; the others leave it running.
        if not trials_in(study, "RUNNING"):
            if status == "FINISHED":
                study_runs.record_best(parent, study)
                study_runs.log_figures(parent, study)
            study_runs.set_parent_status(parent, status)
    finished = len(trials_in(study, "COMPLETE", "PRUNED"))
    print(f"tune: study {arguments.study} has {finished} finished trial(s) of {arguments.trials}")
    if trials_in(study, "COMPLETE"):
        print(export(study))
    return 0


def work(study, budget: int, timeout: float | None, objective, poll_seconds: float = 1.0) -> None:
    """Run trials until the study has `budget` finished ones, or `timeout` has passed.

    A trial starts only while finished plus running trials are below the
    budget. When they are not, the worker waits: a running trial of another
    worker may still fail (its worker killed), and its retry needs a worker.
    """
    from optuna.storages import fail_stale_trials

    from mnist_mlops.tuning.trial import BudgetSpent

    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        fail_stale_trials(study)
        finished = len(trials_in(study, "COMPLETE", "PRUNED"))
        if finished >= budget or (deadline is not None and time.monotonic() > deadline):
            return
        if finished + len(trials_in(study, "RUNNING")) >= budget:
            time.sleep(poll_seconds)
            continue
        try:
            study.optimize(
                objective, n_trials=1, catch=(BudgetSpent,), callbacks=[objective.report]
            )
        except ValueError as error:
            # Another worker failed this trial as stale (its heartbeat missed while the
            # storage was away), and Optuna then refuses this worker's result for it:
            # the failed-trial callback retries it, and this worker goes on.
            if not str(error).startswith("Cannot tell a FAIL trial"):
                raise


def export(study) -> str:
    """Write the best trial's preset, in the study's own search space; return what to run next."""
    from mnist_mlops.tuning import search

    try:
        best = study.best_trial
    except ValueError:
        raise studies.StudyError(f"study {study.study_name} has no complete trial yet") from None
    space = search.load(study.user_attrs["search"], study.user_attrs.get("overrides", []))
    finished = len(trials_in(study, "COMPLETE", "PRUNED"))
    note = (
        f"The best trial ({best.number}) of Optuna study {study.study_name}, "
        f"{finished} finished trials: val_accuracy {best.value:.4f}."
    )
    path = search.export_preset(space, best.params, study.study_name, note)
    return f"tune: best trial {best.number} ({best.value:.4f}) is {path}; run it with\n" + (
        f"  dvc exp run -S experiment={study.study_name}"
    )


def _processed_files():
    return [PROCESSED_MANIFEST, *(processed_split_file(split) for split in ("train", "validation"))]


def _data_digest() -> str:
    from mnist_mlops.pipeline.preprocess import load_manifest

    return load_manifest()["digest"]
