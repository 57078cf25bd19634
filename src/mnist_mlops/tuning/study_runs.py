"""How an Optuna study appears in MLflow: one parent run, one child run per trial.

The parent is made by whichever worker creates the study, and its run id is
kept in the study's user attributes, so every worker on every machine nests
its trials under it. The parent holds what the study is (search space,
sampler, pruner), the best trial so far, and at the end Optuna's figures.
Each trial's run logs the same flattened params as a pipeline run, so the UI
and `mnist-mlops runs` compare them with the pipeline's runs; trials register
no model and are never scored on the test set.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from contextlib import contextmanager, suppress
from typing import Any

from mnist_mlops.tracking.runs import active_run, provenance_tags, termination_deferred

PARENT_RUN_ATTR = "mlflow_parent_run_id"
TRIAL_RUN_ATTR = "mlflow_run_id"
ROLE_TAG = "optuna.role"  # "study" on the parent, "trial" on its children
OBJECTIVE = "val_accuracy"


def create_parent(
    experiment_id: str,
    study: str,
    params: Mapping[str, Any],
    space: Mapping[str, Any],
    data_digest: str,
) -> str:
    """Start the study's parent run (left RUNNING: workers come and go); return its id."""
    from mlflow import MlflowClient

    from mnist_mlops.tracking.ui import NOTE_TAG

    client = MlflowClient()
    note = (
        f"Optuna study {study}: each child run is one trial, scored on {OBJECTIVE} "
        "(the test set stays with the pipeline's evaluate stage)."
    )
    tags = {
        **provenance_tags(data_digest),
        "optuna.study": study,
        ROLE_TAG: "study",
        NOTE_TAG: note,
    }
    run = client.create_run(experiment_id, run_name=study, tags=tags)
    run_id = run.info.run_id
    for key, value in params.items():
        client.log_param(run_id, key, value)
    client.log_dict(run_id, dict(space), "search_space.yaml")
    return run_id


def discard_parent(run_id: str) -> None:
    """Delete a parent run that lost the race to create the study."""
    from mlflow import MlflowClient

    client = MlflowClient()
    client.set_terminated(run_id, status="KILLED")
    client.delete_run(run_id)


def set_parent_status(run_id: str, status: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    if status == "RUNNING":
        if client.get_run(run_id).info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status=status)


def record_best(run_id: str, study) -> None:
    """Log the best trial so far to the parent: a metric by finished trials, tags, params file."""
    from mlflow import MlflowClient
    from optuna.trial import TrialState

    client = MlflowClient()
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    try:
        best = study.best_trial
    except ValueError:  # no complete trial yet
        return
    client.log_metric(run_id, f"best_{OBJECTIVE}", best.value, step=len(finished))
    client.set_tag(run_id, "optuna.best_trial", str(best.number))
    client.set_tag(run_id, f"optuna.best_{OBJECTIVE}", f"{best.value:.4f}")
    client.log_dict(
        run_id,
        {"trial": best.number, OBJECTIVE: best.value, "params": best.params},
        "best_trial.json",
    )


def log_figures(run_id: str, study) -> list[str]:
    """Optuna's matplotlib figures of the study, logged to the parent; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow import MlflowClient
    from optuna.visualization import matplotlib as figures

    client = MlflowClient()
    logged = []
    for name, plot in (
        ("optimization_history", figures.plot_optimization_history),
        ("param_importances", figures.plot_param_importances),
        ("intermediate_values", figures.plot_intermediate_values),
    ):
        try:
            axes = plot(study)
        except Exception as error:  # e.g. too few complete trials; the study stands without it
            print(f"tune: no {name} figure: {error}", file=sys.stderr)
            continue
        figure = getattr(axes, "figure", None) or axes.flat[0].figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        client.log_figure(run_id, figure, f"{name}.png")
        plt.close(figure)
        logged.append(name)
    return logged


@contextmanager
def trial_run(experiment_id: str, parent_run_id: str, study: str, trial, data_digest: str):
    """A child run for one trial; tagged FAIL, and ended FAILED or KILLED, if the trial raises."""
    import mlflow

    tags = {
        **provenance_tags(data_digest),
        "optuna.study": study,
        "optuna.trial_number": str(trial.number),
        "optuna.state": "RUNNING",
        ROLE_TAG: "trial",
    }
    with active_run(
        experiment_id=experiment_id,
        run_name=f"{study}-{trial.number}",
        parent_run_id=parent_run_id,
        tags=tags,
        log_system_metrics=False,
    ) as run:
        trial.set_user_attr(TRIAL_RUN_ATTR, run.info.run_id)
        try:
            yield run
        except BaseException:
            with suppress(Exception), termination_deferred():
                mlflow.set_tag("optuna.state", "FAIL")
            raise


def fail_trial_run(trial) -> None:
    """Mark a dead worker's trial run FAILED (for Optuna's stale-trial callback)."""
    from mlflow import MlflowClient

    run_id = trial.user_attrs.get(TRIAL_RUN_ATTR)
    if not run_id:
        return
    client = MlflowClient()
    client.set_tag(run_id, "optuna.state", "FAIL")
    # On the worker's own host the next command may have ended it already.
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_tag(run_id, "ended_by", "tune: the trial's heartbeat stopped")
        client.set_terminated(run_id, status="FAILED")
