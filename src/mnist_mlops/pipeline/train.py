"""Stage `train`: fit the configured network and record the run in MLflow.

Two entry points share `train(config, outputs)`:

- the DVC stage, `python -m mnist_mlops train`, reads params.yaml (what DVC
  composed from conf/, including `dvc exp run -S` overrides);
- the Hydra app, `python -m mnist_mlops.pipeline.train model=cnn train.epochs=1` (and
  `-m` for multirun), composes conf/ itself for quick runs without DVC and
  writes into Hydra's output folder instead of the DVC outputs.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from mnist_mlops.atomic import atomic_path, write_json, write_text
from mnist_mlops.config import Config, ConfigError, validate
from mnist_mlops.model import flavors
from mnist_mlops.model.architectures import INFERENCE_BATCH_SIZE, build_model, import_keras
from mnist_mlops.model.export import export_verified
from mnist_mlops.paths import (
    CONFIG_DIR,
    MODEL_FILE,
    ONNX_MODEL_FILE,
    RUN_FILE,
    TRAINING_CURVES_FILE,
)
from mnist_mlops.pipeline import distributed
from mnist_mlops.pipeline.preprocess import load_manifest, load_split, load_weights
from mnist_mlops.tracking.datasets import log_training_data
from mnist_mlops.tracking.outage import RunLog, patient_requests, system_metrics
from mnist_mlops.tracking.runs import active_run, provenance_tags, termination_deferred
from mnist_mlops.tracking.store import use_experiment

EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


@dataclass(frozen=True)
class TrainOutputs:
    model_file: Path = MODEL_FILE
    onnx_file: Path = ONNX_MODEL_FILE
    run_file: Path = RUN_FILE
    curves_file: Path = TRAINING_CURVES_FILE

    @classmethod
    def inside(cls, directory: Path) -> TrainOutputs:
        return cls(
            directory / MODEL_FILE.name,
            directory / ONNX_MODEL_FILE.name,
            directory / RUN_FILE.name,
            directory / "training.csv",
        )


def _epoch_logger(log_metrics=None):
    """A Keras callback that logs each epoch's metrics to the active MLflow run.

    `log_metrics(metrics, step)` defaults to a synchronous write; the stage
    passes its RunLog's, which only queues them.
    """
    import mlflow

    keras = import_keras()

    def log_now(metrics: dict[str, float], step: int) -> None:
        with termination_deferred():
            mlflow.log_metrics(metrics, step=step)

    log = log_metrics or log_now

    class EpochMetrics(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            log({name: float(value) for name, value in (logs or {}).items()}, epoch)

    return EpochMetrics()


def curves_csv(history: dict[str, list[float]]) -> str:
    """Per-epoch metrics as CSV, one row per epoch (a DVC plot)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["epoch", *EPOCH_METRICS])
    epochs = len(history["loss"])
    for epoch in range(epochs):
        writer.writerow([epoch + 1, *(f"{history[name][epoch]:.6f}" for name in EPOCH_METRICS)])
    return buffer.getvalue()


def train(
    config: Config, outputs: TrainOutputs = TrainOutputs(), local_workers: bool = False
) -> dict[str, float]:
    """Fit the model, save it to `outputs`, log the run to MLflow; return the final metrics.

    With `train.distributed.processes` > 1 the fit is data-parallel
    (pipeline/distributed.py); `local_workers` starts the other processes here
    instead of waiting for `mnist-mlops train-worker` on other machines.
    """
    import mlflow

    # The tracking store first: a server that is down fails the stage in
    # seconds, before TensorFlow loads.
    experiment_id = use_experiment(config.mlflow)
    keras = import_keras()
    train_images, train_labels = load_split("train")
    validation_images, validation_labels = load_split("validation")
    manifest = load_manifest()
    data_digest = manifest["digest"]

    # Under `dvc exp run` the MLflow run takes the DVC experiment's name. The
    # run starts before the seed is set, because MLflow draws its generated
    # names from Python's random module, which the seed also fixes.
    # Once the fit is under way, the run rides out a tracking outage of up to
    # mlflow.outage_seconds (tracking/outage.py): the fit's logs are queued,
    # and the requests after it wait as long.
    outage = config.mlflow.outage_seconds
    with ExitStack() as after_the_fit, active_run(run_name=os.environ.get("DVC_EXP_NAME")) as run:
        keras.utils.set_random_seed(config.train.seed)
        network = build_model(config.model, config.optimizer)
        mlflow.log_params(config.flat_params())
        mlflow.set_tags({**provenance_tags(data_digest), "serving.runtime": config.serving.runtime})
        if "feedback" in manifest:
            feedback = manifest["feedback"]
            mlflow.set_tags({f"data.feedback.{key}": str(value) for key, value in feedback.items()})
        log_training_data()
        started = time.perf_counter()
        with (
            RunLog(run.info.run_id, outage) as run_log,
            system_metrics(run_log, config.mlflow.system_metrics_interval_seconds),
        ):
            if config.train.distributed.processes > 1:
                history = fit_across_processes(config, network, local_workers, run_log)
            else:
                run_log.tags({"train.backend": "tensorflow", "train.processes": "1"})
                history = fit(
                    config,
                    network,
                    (train_images, train_labels),
                    (validation_images, validation_labels),
                    weights=load_weights("train"),
                    log_metrics=run_log.metrics,
                ).history
            fit_seconds = time.perf_counter() - started
            run_log.metrics({"fit_seconds": fit_seconds})
            after_the_fit.enter_context(patient_requests(outage))
            model_uri = save_and_log(config, network, validation_images, history, outputs)
        write_json(
            outputs.run_file,
            {
                "run_id": run.info.run_id,
                "experiment_id": experiment_id,
                "model_uri": model_uri,
            },
        )
    final = {name: float(values[-1]) for name, values in history.items()}
    print(
        f"trained {config.model_name} for {config.train.epochs} epochs in {fit_seconds:.1f} s: "
        f"val_accuracy {final['val_accuracy']:.4f}; MLflow run {run.info.run_id}"
    )
    return final


def fit_across_processes(
    config: Config, network, local_workers: bool, run_log: RunLog
) -> dict[str, list[float]]:
    """The data-parallel fit: process 0 in a child on JAX, its weights into `network` here."""
    processes = config.train.distributed.processes
    run_log.tags({"train.backend": "jax", "train.processes": str(processes)})
    if not local_workers:
        others = "process 1" if processes == 2 else f"processes 1–{processes - 1}"
        print(
            f"waiting up to {config.train.distributed.timeout_seconds} s for {others}: "
            f"mnist-mlops train-worker --coordinator {config.train.distributed.coordinator} "
            f"--process-id I --processes {processes}",
            flush=True,
        )

    def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
        run_log.metrics(metrics, step=epoch)

    fitted = distributed.fit(config, local_workers, log_epoch)
    network.set_weights(fitted.weights)
    network.optimizer.build(network.trainable_variables)
    if len(network.optimizer.variables) == len(fitted.optimizer):
        for variable, value in zip(network.optimizer.variables, fitted.optimizer, strict=True):
            variable.assign(value)
    run_log.tags({"train.weights_sha256": fitted.digest})
    return fitted.history


def fit(
    config: Config,
    network,
    training,
    validation,
    callbacks=(),
    verbose: int = 2,
    weights=None,
    log_metrics=None,
):
    """Fit `network` on (images, labels) pairs; every epoch's metrics go to the active run.

    `weights` are per-example sample weights (the feedback's), None when all count once;
    `log_metrics` is how each epoch's metrics are logged (see _epoch_logger).
    """
    images, labels = training
    return network.fit(
        images,
        labels,
        sample_weight=weights,
        validation_data=validation,
        epochs=config.train.epochs,
        batch_size=config.train.batch_size,
        validation_batch_size=INFERENCE_BATCH_SIZE,
        callbacks=[_epoch_logger(log_metrics), *callbacks],
        verbose=verbose,
    )


def save_and_log(config: Config, network, validation_images, history, outputs: TrainOutputs):
    """Save the fitted model and its curves, and log them to the run; return the model's URI."""
    import mlflow

    # From here on Keras's progress bars (MLflow checks the input example
    # with model.predict) would only clutter the stage's output.
    import_keras().config.disable_interactive_logging()
    save_models(config, network, validation_images, outputs)
    model_uri = flavors.log_keras_model(network, validation_images[:1])
    if config.serving.runtime == "onnx":
        flavors.log_onnx_model(outputs.onnx_file, validation_images[:1])
    curves = curves_csv(history)
    write_text(outputs.curves_file, curves)
    mlflow.log_text(curves, "training.csv")
    return model_uri


def save_models(config: Config, network, validation_images, outputs: TrainOutputs) -> None:
    """Save the Keras model and, for the ONNX runtime, its export checked against it.

    Both files are renamed into place only after the export has passed its
    check, so a stage that fails here leaves neither behind.
    """
    import mlflow

    with ExitStack() as outputs_in_progress:
        if config.serving.runtime == "onnx":
            onnx_file = outputs_in_progress.enter_context(atomic_path(outputs.onnx_file))
            started = time.perf_counter()
            difference = export_verified(network, config.model_name, validation_images, onnx_file)
            mlflow.log_metrics(
                {
                    "onnx_max_probability_difference": difference,
                    "onnx_export_seconds": time.perf_counter() - started,
                }
            )
        keras_file = outputs_in_progress.enter_context(atomic_path(outputs.model_file))
        network.save(keras_file)


def _hydra_app() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, OmegaConf

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR.resolve()), config_name="config")
    def app(composed: DictConfig) -> float:
        try:
            config = validate(OmegaConf.to_container(composed, resolve=True))
        except ConfigError as error:
            sys.exit(f"invalid config: {error}")
        output_dir = Path(HydraConfig.get().runtime.output_dir)
        return train(config, TrainOutputs.inside(output_dir))["val_accuracy"]

    app()


if __name__ == "__main__":
    from mnist_mlops.processes import collect_less

    collect_less()
    _hydra_app()
