"""One Optuna trial of `mnist-mlops tune`: compose its config, train, report each epoch.

The data is loaded once per worker. Each trial trains from the config's seed,
so the exported preset run through the pipeline trains the same network. A
Keras callback reports val_accuracy to Optuna after every epoch and stops
the fit when the pruner cuts the trial.
"""

from __future__ import annotations

import os
import socket
import time

from mnist_mlops.config import validate
from mnist_mlops.model.architectures import build_model, import_keras
from mnist_mlops.pipeline.preprocess import load_split, load_weights
from mnist_mlops.tracking.runs import termination_deferred
from mnist_mlops.tuning import study_runs
from mnist_mlops.tuning.studies import trials_in


class BudgetSpent(Exception):
    """Another worker claimed the study's last trial in the same instant."""


def within_budget(study, trial, budget: int) -> bool:
    """Finished trials, and the running ones that started before this one, leave room for it."""
    ahead = trials_in(study, "COMPLETE", "PRUNED") + [
        other for other in trials_in(study, "RUNNING") if other.number < trial.number
    ]
    return len(ahead) < budget


def pruning_callback(trial):
    """Report val_accuracy after each epoch; stop the fit when the pruner says so."""
    keras = import_keras()

    class Pruning(keras.callbacks.Callback):
        pruned_after: int | None = None

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            with termination_deferred():
                trial.report(float((logs or {})[study_runs.OBJECTIVE]), step=epoch)
                should_prune = trial.should_prune()
            if should_prune:
                self.pruned_after = epoch + 1
                self.model.stop_training = True

    return Pruning()


class Objective:
    """Optuna's objective: one child run, one fit, the final val_accuracy."""

    def __init__(self, space, budget: int, experiment_id: str, parent_run_id: str, digest: str):
        self.space, self.budget = space, budget
        self.experiment_id, self.parent_run_id, self.digest = experiment_id, parent_run_id, digest
        self.training = load_split("train")
        self.weights = load_weights("train")
        self.validation = load_split("validation")

    def __call__(self, trial) -> float:
        import mlflow
        import optuna

        from mnist_mlops.pipeline.train import fit

        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        if not within_budget(trial.study, trial, self.budget):
            trial.set_user_attr("budget_spent", True)
            raise BudgetSpent(f"the study's {self.budget} trials are all taken")
        values = {parameter.name: parameter.suggest(trial) for parameter in self.space.parameters}
        config = validate(self.space.compose_trial(values))
        keras = import_keras()
        keras.backend.clear_session()
        started = time.perf_counter()
        with study_runs.trial_run(
            self.experiment_id, self.parent_run_id, trial.study.study_name, trial, self.digest
        ):
            mlflow.log_params(config.flat_params())
            keras.utils.set_random_seed(config.train.seed)
            network = build_model(config.model, config.optimizer)
            pruning = pruning_callback(trial)
            history = fit(
                config,
                network,
                self.training,
                self.validation,
                [pruning],
                verbose=0,
                weights=self.weights,
            )
            epochs = len(history.history["loss"])
            state = "COMPLETE" if pruning.pruned_after is None else "PRUNED"
            with termination_deferred():
                mlflow.log_metrics(
                    {"epochs_run": epochs, "fit_seconds": time.perf_counter() - started}
                )
                mlflow.set_tag("optuna.state", state)
                trial.set_user_attr("epochs_run", epochs)
        value = float(history.history[study_runs.OBJECTIVE][-1])
        if state == "PRUNED":
            raise optuna.TrialPruned(f"after epoch {epochs} at val_accuracy {value:.4f}")
        return value

    def report(self, study, trial) -> None:
        """After each trial: one line, and the best so far on the parent run."""
        finished = len(trials_in(study, "COMPLETE", "PRUNED"))
        params = ", ".join(f"{key}={_short(value)}" for key, value in trial.params.items())
        value = (
            trial.value
            if trial.value is not None
            else trial.intermediate_values.get(max(trial.intermediate_values, default=-1))
        )
        shown = "-" if value is None else f"{value:.4f}"
        epochs = trial.user_attrs.get("epochs_run", 0)
        print(
            f"tune: trial {trial.number} {trial.state.name}: val_accuracy {shown} after "
            f"{epochs} epoch(s) ({params}); {finished} of {self.budget} finished",
            flush=True,
        )
        if trial.state.name == "COMPLETE":
            study_runs.record_best(self.parent_run_id, study)


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
