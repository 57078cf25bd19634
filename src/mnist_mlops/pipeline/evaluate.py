"""Stage `evaluate`: score the trained model on the test set, in the training run.

It scores the artifact that will be served: with `serving.runtime: onnx` (the
default) models/model.onnx under ONNX Runtime, without ever importing
TensorFlow; with `keras`, models/model.keras under Keras.

Writes reports/metrics.json (DVC metrics), per-class accuracy, every test
prediction as a CSV that DVC draws as a confusion matrix, and the test
images the model got most confidently wrong (reports/mistakes.png, a DVC
image plot); logs the same numbers and both images to the MLflow run that
trained the model, with a one-line description of the run.

With a recent split (the newest feedback, see preprocess) it also reports
recent_accuracy, scores the champion on the same images, and the gate
judges by both (tracking/registry.py).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mnist_mlops.atomic import atomic_path, write_json, write_text
from mnist_mlops.config import Config
from mnist_mlops.model import flavors
from mnist_mlops.model.architectures import INFERENCE_BATCH_SIZE, NUM_CLASSES, import_keras
from mnist_mlops.monitoring.calibration import calibrate, log_calibration
from mnist_mlops.monitoring.reference import (
    REFERENCE_ARTIFACT_DIR,
    reference_profile,
    reference_source,
    save_reference,
)
from mnist_mlops.paths import (
    METRICS_FILE,
    MISTAKES_FILE,
    MODEL_FILE,
    ONNX_MODEL_FILE,
    PER_CLASS_FILE,
    PREDICTIONS_FILE,
    REFERENCE_FILE,
    REGISTRY_FILE,
    RUN_FILE,
)
from mnist_mlops.pipeline.figures import confusion_image, mistakes_image, predictions_csv
from mnist_mlops.pipeline.model_card import link_card, log_card, model_card
from mnist_mlops.pipeline.preprocess import has_split, load_split
from mnist_mlops.pipeline.robustness import (
    SUITE,
    SUITE_TAG,
    before,
    champion_scores,
    perturbed,
    suite_accuracy,
    worst_class,
)
from mnist_mlops.serving.follow import known_digits
from mnist_mlops.tracking import ui
from mnist_mlops.tracking.datasets import log_model_metrics
from mnist_mlops.tracking.registry import (
    Gate,
    Scores,
    register,
)
from mnist_mlops.tracking.runs import active_run
from mnist_mlops.tracking.store import use_experiment

# Keras clips probabilities to this before taking logs in its cross-entropy.
_EPSILON = 1e-7


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Counts indexed [true digit, predicted digit]."""
    pairs = labels.astype(np.int64) * NUM_CLASSES + predicted
    return np.bincount(pairs, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)


def score(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """Test loss, accuracy and per-class accuracy from the predicted probabilities."""
    predicted = probabilities.argmax(axis=1)
    chosen = probabilities[np.arange(len(labels)), labels]
    matrix = confusion_matrix(labels, predicted)
    class_totals = matrix.sum(axis=1)
    per_class = {
        str(digit): float(matrix[digit, digit] / class_totals[digit])
        for digit in range(NUM_CLASSES)
        if class_totals[digit]
    }
    return {
        "test_loss": float(-np.log(np.clip(chosen, _EPSILON, 1 - _EPSILON)).mean()),
        "test_accuracy": float((predicted == labels).mean()),
        "per_class_accuracy": per_class,
        "confusion_matrix": matrix,
        "predicted": predicted,
    }


def served_model_file(config: Config):
    """The model file that the configured runtime scores and serves."""
    return ONNX_MODEL_FILE if config.serving.runtime == "onnx" else MODEL_FILE


def served_scorer(config: Config):
    """The served model's probabilities for a batch of images, from the configured runtime,
    the model loaded once."""
    if config.serving.runtime == "onnx":
        from mnist_mlops.model.export import inference_session, predict_probabilities

        session = inference_session(ONNX_MODEL_FILE)
        return lambda images: predict_probabilities(session, images)
    network = import_keras().saving.load_model(MODEL_FILE)
    return lambda images: network.predict(images, batch_size=INFERENCE_BATCH_SIZE, verbose=0)


def evaluate(config: Config) -> dict[str, float]:
    """Evaluate the served model file on the test (and recent) split, register it, gate it.

    Returns test_accuracy, test_loss, recent_examples and, with a recent split, recent_accuracy.
    """
    import mlflow

    images, labels = load_split("test")
    # The robustness suite is made while MLflow's store opens (numpy and Pillow
    # release the GIL): a third of a second less on two cores.
    making = ThreadPoolExecutor(1, "robustness-suite")
    suite_made = making.submit(perturbed, images)
    making.shutdown(wait=False)
    experiment_id = use_experiment(config.mlflow)
    run_id = json.loads(RUN_FILE.read_text())["run_id"]
    served_probabilities = served_scorer(config)
    probabilities = served_probabilities(images)
    result = score(labels, probabilities)
    metrics = {name: result[name] for name in ("test_accuracy", "test_loss")}
    recent_images, recent_labels = load_split("recent") if has_split("recent") else (None, None)
    metrics["recent_examples"] = 0 if recent_labels is None else len(recent_labels)
    if metrics["recent_examples"]:
        recent_predicted = served_probabilities(recent_images).argmax(axis=1)
        metrics["recent_accuracy"] = float((recent_predicted == recent_labels).mean())
    # The robustness suite, and the digit answered worst (pipeline/robustness.py).
    suite = suite_made.result()
    robust = suite_accuracy(lambda batch: served_probabilities(batch).argmax(axis=1), suite, labels)
    metrics |= {f"robustness_{name}": value for name, value in robust.items()}
    metrics["worst_class_accuracy"] = worst_class(labels, result["predicted"])[1]
    scores = Scores(
        metrics["test_accuracy"],
        metrics.get("recent_accuracy"),
        metrics["recent_examples"],
        robust,
        metrics["worst_class_accuracy"],
    )
    # The champion is judged on the same images, before this version exists.
    champion = champion_scores(config, recent_images, recent_labels, suite, labels)

    validation = load_split("validation")
    validation_probabilities = served_probabilities(validation[0])
    calibration = calibrate(validation_probabilities, validation[1])
    source = reference_source(metrics["recent_examples"])
    if source == "recent":
        reference = reference_profile(recent_images, served_probabilities(recent_images))
    else:
        reference = reference_profile(validation[0], validation_probabilities)
    # The monitor estimates accuracy from confidence calibrated by this temperature.
    reference["temperature"] = np.float64(calibration["temperature"])
    save_reference(REFERENCE_FILE, reference)
    write_json(PER_CLASS_FILE, result["per_class_accuracy"])
    write_text(PREDICTIONS_FILE, predictions_csv(labels, result["predicted"]))
    mistakes = mistakes_image(images, labels, probabilities)
    with atomic_path(MISTAKES_FILE) as staging:
        mistakes.save(staging, format="PNG")
    with active_run(run_id=run_id) as run:
        note = _run_note(config, run, metrics["test_accuracy"])
        mlflow.set_tag(ui.NOTE_TAG, note)
        mlflow.log_image(mistakes, "mistakes.png")
        log_calibration(calibration)
        known = known_digits(images, labels, result["predicted"])
        model_info = flavors.log_classifier(
            config.serving.runtime,
            served_model_file(config),
            images[:1],
            config.serving.max_batch_size,
            (images[known], labels[known]),
        )
        per_class = result["per_class_accuracy"]
        model_id = model_info.model_id
        # The model's description in the Models tab, as the run's in the runs table.
        mlflow.set_logged_model_tags(model_id, {ui.NOTE_TAG: note})
        log_model_metrics(run_id, model_id, metrics, per_class)
        mlflow.log_image(confusion_image(result["confusion_matrix"]), "confusion_matrix.png")
        mlflow.log_dict(per_class, "per_class_accuracy.json")
        mlflow.log_artifact(str(REFERENCE_FILE), REFERENCE_ARTIFACT_DIR)
        mlflow.set_tag("reference.source", source)
        if champion[1] is not None and champion[1].recent_accuracy is not None:
            mlflow.log_metric("champion_recent_accuracy", champion[1].recent_accuracy)
        registration = _register(config, run, scores, champion, model_info.model_uri)
        card = model_card(
            config, mlflow.get_run(run_id), registration, metrics, per_class, source, model_id
        )
        link_card(
            mlflow.MlflowClient(), registration, log_card(mlflow.MlflowClient(), card, run_id)
        )
        mlflow.set_tags(
            {
                "registry.version": str(registration.version),
                "registry.promoted": str(registration.promoted).lower(),
            }
        )
    # The UI's saved view of the training runs, with this run among them.
    ui.save_view(mlflow.MlflowClient(), experiment_id)
    # The metrics files are written last: DVC and users read them as the sign of
    # a complete evaluation.
    write_json(
        REGISTRY_FILE,
        {
            "run_id": run_id,
            "version": registration.version,
            "promoted": registration.promoted,
            "champion_version": registration.champion_version,
            "reason": registration.reason,
            "before": before(champion),
        },
    )
    write_json(METRICS_FILE, metrics)
    recent = (
        f", recent_accuracy {metrics['recent_accuracy']:.4f} on {metrics['recent_examples']}"
        if metrics["recent_examples"]
        else ""
    )
    print(
        f"test_accuracy {metrics['test_accuracy']:.4f}, test_loss {metrics['test_loss']:.4f}"
        f"{recent} (MLflow run {run_id})\n"
        f"registered {registration.model_name} v{registration.version}: {registration.reason}"
    )
    return metrics


def _run_note(config: Config, run, test_accuracy: float) -> str:
    optimizer = config.raw["optimizer"]
    return ui.run_note(
        config.model_name,
        optimizer["name"],
        optimizer["learning_rate"],
        config.train.epochs,
        test_accuracy,
        (run.data.tags or {}).get("dvc.exp_name"),
    )


def _register(config: Config, run, scores: Scores, champion: tuple, model_uri: str):
    """Register the servable classifier, and let the gate and reconciliation decide the champion
    (tracking/registry.py, tracking/promotion.py)."""
    tags = dict(run.data.tags) if run.data.tags else {}
    provenance = {
        "run_id": run.info.run_id,
        "git.commit": tags.get("git.commit", "unknown"),
        "data.digest": tags.get("data.digest", "unknown"),
        "model.name": config.model_name,
        "serving.runtime": config.serving.runtime,
        SUITE_TAG: SUITE,
    }
    if tags.get("dvc.exp_name"):
        provenance["dvc.exp_name"] = tags["dvc.exp_name"]
    runtime = config.serving.runtime
    served_by = {
        "onnx": "ONNX Runtime on the ONNX export (checked against Keras; no TensorFlow)",
        "keras": "Keras on TensorFlow",
    }[runtime]
    recent = (
        f", recent_accuracy {scores.recent_accuracy:.4f} on {scores.recent_examples} images"
        if scores.recent_accuracy is not None
        else ""
    )
    description = (
        f"{config.model_name} trained for {config.train.epochs} epochs on MNIST "
        f"(processed data {provenance['data.digest'][:12]}) at commit "
        f"{provenance['git.commit'][:12]}; test_accuracy {scores.test_accuracy:.4f}{recent}. "
        f"Served by {served_by}. MLflow run {run.info.run_id}."
    )
    # No lock: evaluators on any machine may register at once, and
    # reconciliation leaves the best eligible version champion whatever the order.
    return register(
        model_uri,
        config.registry.model_name,
        scores,
        Gate(
            config.registry.promotion_margin,
            config.registry.test_tolerance,
            config.registry.robustness_tolerance,
            config.registry.worst_class_floor,
        ),
        provenance,
        description,
        champion=champion,
    )
