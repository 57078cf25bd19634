"""The ONNX export: checked against Keras in train, scored and served without TensorFlow."""

import json
import sys
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from mnist_mlops.__main__ import main
from mnist_mlops.config import validate
from mnist_mlops.model import export as onnx_export
from mnist_mlops.model.architectures import build_model, import_keras
from mnist_mlops.model.export import ExportError, compare, inference_session, predict_probabilities
from mnist_mlops.paths import MODEL_FILE, ONNX_MODEL_FILE, RUN_FILE
from mnist_mlops.pipeline.evaluate import evaluate
from mnist_mlops.pipeline.fetch import fetch
from mnist_mlops.pipeline.preprocess import load_split, preprocess
from mnist_mlops.pipeline.train import train
from mnist_mlops.tracking.leaderboard import render, rows
from mnist_mlops.tracking.store import tracking_uri

from ..conftest import compose_config, run, subprocess_env, tiny_overrides

CHAMPION_URI = "models:/mnist-classifier@champion"
_ONNX_NAMES = ("mlflow-skinny", "onnxruntime", "numpy", "pandas")


def configured(mirror, *overrides):
    return validate(compose_config(*tiny_overrides(mirror), "train.epochs=1", *overrides))


@pytest.fixture
def prepared(workdir, mirror):
    config = configured(mirror)
    fetch(config.data)
    preprocess(config)
    return mirror


def the_run():
    client = MlflowClient(tracking_uri())
    (logged,) = client.search_runs([client.get_experiment_by_name("mnist").experiment_id])
    return client, logged


@pytest.mark.parametrize("architecture", ["mlp", "cnn"])
def test_train_exports_an_onnx_model_that_predicts_like_keras(prepared, architecture, monkeypatch):
    from mlflow.utils import requirements_utils

    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)
    config = configured(prepared, f"model={architecture}")
    train(config)
    # Both models' pins are the installed versions: MLflow did not scan every installed
    # package to check them (for the classifier, see the test of evaluate below).
    assert requirements_utils._MODULES_TO_PACKAGES is None

    _client, logged = the_run()
    difference = logged.data.metrics["onnx_max_probability_difference"]
    assert 0 <= difference <= onnx_export.MAX_PROBABILITY_DIFFERENCE
    assert logged.data.tags["serving.runtime"] == "onnx"

    images, _labels = load_split("test")
    network = import_keras().saving.load_model(MODEL_FILE)
    expected = network.predict(images, verbose=0)
    exported = predict_probabilities(inference_session(ONNX_MODEL_FILE), images)
    assert exported.argmax(axis=1).tolist() == expected.argmax(axis=1).tolist()
    np.testing.assert_allclose(exported, expected, atol=onnx_export.MAX_PROBABILITY_DIFFERENCE)

    # The same export is logged with MLflow's ONNX flavor in the training run.
    info = mlflow.models.get_model_info(f"runs:/{logged.info.run_id}/onnx_model")
    assert "onnx" in info.flavors
    pinned = f"runs:/{logged.info.run_id}/onnx_model/requirements.txt"
    pinned = Path(mlflow.artifacts.download_artifacts(pinned))
    pins = dict(line.split("==") for line in pinned.read_text().split())
    assert pins == {name: metadata.version(name) for name in (*_ONNX_NAMES, "onnx")}
    assert info.signature.inputs.inputs[0].shape == (-1, 28, 28)
    logged_onnx = mlflow.pyfunc.load_model(f"runs:/{logged.info.run_id}/onnx_model")
    (outputs,) = logged_onnx.predict(images[:5].astype(np.float32)).values()
    np.testing.assert_allclose(outputs, exported[:5], atol=1e-6)


def test_an_export_that_disagrees_with_keras_fails_the_stage_and_writes_nothing(
    prepared, workdir, monkeypatch, capsys
):
    """An export of other weights stands in for a conversion that went wrong."""
    config = configured(prepared)
    (workdir / "params.yaml").write_text(yaml.safe_dump(dict(config.raw)))
    real_export = onnx_export.export

    def export_other_weights(network, target):
        import_keras().utils.set_random_seed(7)
        stranger = build_model(config.model, config.optimizer)
        stranger.predict(np.zeros((1, 28, 28), np.float32), verbose=0)
        real_export(stranger, target)

    monkeypatch.setattr(onnx_export, "export", export_other_weights)
    assert main(["train"]) == 1
    # MLflow's own log lines (creating the store) may come first; the error is one line.
    stderr = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in stderr if line.startswith("mnist-mlops")]
    assert errors == stderr[-1:], stderr
    assert errors[0].startswith(
        "mnist-mlops train: error: the mlp model does not export faithfully to ONNX"
    )
    assert "set serving.runtime=keras" in errors[0]
    assert not ONNX_MODEL_FILE.exists() and not MODEL_FILE.exists() and not RUN_FILE.exists()
    assert not list(Path("models").glob(".*partial*"))
    _client, logged = the_run()
    assert logged.info.status == "FAILED"


def test_compare_allows_float_noise_and_nothing_more():
    rng = np.random.default_rng(0)
    expected = rng.dirichlet(np.ones(10), size=100).astype(np.float32)
    assert compare("mlp", expected, expected + 5e-7) == pytest.approx(5e-7, rel=0.1)
    with pytest.raises(ExportError, match=r"0 predicted digit.* up to 2e-05"):
        compare("mlp", expected, expected + 2e-5)
    swapped = expected.copy()
    swapped[0] = np.roll(swapped[0], 1)
    with pytest.raises(ExportError, match=r"the cnn model .* 1 predicted digit"):
        compare("cnn", expected, swapped)


PROBE = """
import json, sys
import numpy as np
{body}
loaded = sorted(name for name in ("tensorflow", "keras", "tf2onnx") if name in sys.modules)
# Whether MLflow scanned every installed package (to check a model's requirements).
requirements = sys.modules.get("mlflow.utils.requirements_utils")
scanned = getattr(requirements, "_MODULES_TO_PACKAGES", None) is not None
print(json.dumps({{"loaded": loaded, "scanned": scanned, "result": result}}))
"""


def probe(body: str, cwd: Path, **env) -> dict:
    """Run `body` in a fresh interpreter; report its `result`, the heavy modules it imported
    and whether MLflow scanned the installed packages."""
    code = PROBE.format(body=body)
    output = run([sys.executable, "-c", code], cwd, subprocess_env(**env)).stdout
    return json.loads(output.strip().splitlines()[-1])


def test_evaluate_and_the_registered_model_never_import_tensorflow(prepared, workdir):
    config = configured(prepared)
    (workdir / "params.yaml").write_text(yaml.safe_dump(dict(config.raw)))
    train(config)

    evaluated = probe("from mnist_mlops.__main__ import main\nresult = main(['evaluate'])", workdir)
    # Its pinned requirements are the installed versions: logging the classifier does
    # not scan every installed package to check them.
    assert evaluated == {"loaded": [], "scanned": False, "result": 0}
    metrics = json.loads(Path("reports/metrics.json").read_text())

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    served = probe(
        "import mlflow\n"
        f"model = mlflow.pyfunc.load_model({CHAMPION_URI!r})\n"
        "images = np.load('data/processed/test.npz', allow_pickle=False)['images']\n"
        "result = [p['digit'] for p in model.predict(images.astype(np.float32))]",
        workdir,
        MLFLOW_TRACKING_URI=uri,
    )
    # Loading a model still checks its requirements against this environment.
    assert served["loaded"] == [] and served["scanned"]
    _images, labels = load_split("test")
    accuracy = float(np.mean(np.asarray(served["result"]) == labels))
    assert accuracy == pytest.approx(metrics["test_accuracy"])

    # What the registry says about the version, and what it needs to run.
    mlflow.set_tracking_uri(uri)
    version, requirements = the_champion()
    assert version.tags["serving.runtime"] == "onnx"
    assert "ONNX Runtime" in version.description
    pins = dict(line.split("==") for line in requirements.split())
    assert pins == {name: metadata.version(name) for name in _ONNX_NAMES}
    table = render(rows("mnist", "mnist-classifier", 10))
    assert table.splitlines()[0].split().count("runtime") == 1
    assert " onnx " in table.splitlines()[1]


def the_champion():
    """The champion's registered version and its requirements.txt."""
    version = MlflowClient().get_model_version_by_alias("mnist-classifier", "champion")
    requirements = mlflow.artifacts.download_artifacts(f"{CHAMPION_URI}/requirements.txt")
    return version, Path(requirements).read_text()


def test_the_keras_runtime_keeps_todays_path(prepared, workdir):
    config = configured(prepared, "serving.runtime=keras")
    train(config)
    assert MODEL_FILE.exists() and not ONNX_MODEL_FILE.exists()
    metrics = evaluate(config)

    version, requirements = the_champion()
    assert version.tags["serving.runtime"] == "keras"
    assert "Keras on TensorFlow" in version.description
    assert "tensorflow==" in requirements and "onnxruntime" not in requirements
    model = mlflow.pyfunc.load_model(CHAMPION_URI)
    images, labels = load_split("test")
    digits = [item["digit"] for item in model.predict(images.astype(np.float32))]
    assert float(np.mean(np.asarray(digits) == labels)) == pytest.approx(metrics["test_accuracy"])
    _client, logged = the_run()
    assert "onnx_max_probability_difference" not in logged.data.metrics


def test_an_unknown_runtime_is_a_one_line_config_error(mirror):
    from mnist_mlops.config import ConfigError

    with pytest.raises(ConfigError, match=r"^serving\.runtime must be one of onnx, keras"):
        configured(mirror, "serving.runtime=tflite")
