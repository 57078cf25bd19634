"""The registry: every evaluated model is a version; the gate decides who is champion."""

import json
import subprocess
import sys

import mlflow
import pytest
from mlflow import MlflowClient

from mnist_mlops.paths import (
    METRICS_FILE,
    PER_CLASS_FILE,
    PROCESSED_DATA_DIR,
    REGISTRY_FILE,
    processed_split_file,
)
from mnist_mlops.pipeline.evaluate import evaluate
from mnist_mlops.pipeline.fetch import fetch
from mnist_mlops.pipeline.preprocess import preprocess
from mnist_mlops.pipeline.robustness import PERTURBATIONS
from mnist_mlops.pipeline.train import train
from mnist_mlops.tracking import history
from mnist_mlops.tracking.datasets import dvc_md5
from mnist_mlops.tracking.promotion import GATE_TAG, REVOKED, reconcile
from mnist_mlops.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    Gate,
    Scores,
    judge,
    register,
    should_promote,
)

from ..conftest import subprocess_env

MODEL = "mnist-classifier"


@pytest.mark.parametrize(
    ("candidate", "champion", "margin", "promoted"),
    [
        (0.90, None, 0.0, True),
        (0.91, 0.90, 0.0, True),
        (0.90, 0.90, 0.0, False),
        (0.89, 0.90, 0.0, False),
        (0.905, 0.90, 0.01, False),
        (0.92, 0.90, 0.01, True),
    ],
)
def test_gate(candidate, champion, margin, promoted):
    assert should_promote(candidate, champion, margin) is promoted


@pytest.mark.parametrize(
    ("candidate", "champion", "eligible", "rule"),
    [
        # Better where the traffic is, half a point worse on the old test set: promoted.
        (Scores(0.975, 0.95, 1000), Scores(0.979, 0.85, 1000), True, "recent"),
        # Better on recent traffic but it forgot the test set: refused.
        (Scores(0.970, 0.96, 1000), Scores(0.979, 0.85, 1000), False, "recent"),
        # Not better on the recent split, however good on test: refused.
        (Scores(0.990, 0.85, 1000), Scores(0.979, 0.85, 1000), False, "recent"),
        # Without a recent split on both sides, today's rule.
        (Scores(0.980), Scores(0.979, 0.85, 1000), True, "test"),
        (Scores(0.978, 0.99, 1000), Scores(0.979), False, "test"),
        (Scores(0.5), None, True, "first"),
    ],
)
def test_the_gate_judges_where_the_traffic_is(candidate, champion, eligible, rule):
    verdict = judge(candidate, champion, Gate(margin=0.0, test_tolerance=0.005))
    assert (verdict.eligible, verdict.rule) == (eligible, rule)
    assert verdict.reason.startswith(f"{rule} rule" if rule != "first" else "first version")


ROBUST = {"thick": 0.85, "noise": 0.87, "rotate": 0.93}
STRICT = Gate(margin=0.0, test_tolerance=0.005, robustness_tolerance=0.02, worst_class_floor=0.9)


@pytest.mark.parametrize(
    ("candidate", "champion", "eligible", "rule", "says"),
    [
        # Better on the test split and as robust: promoted.
        (
            Scores(0.98, robustness=ROBUST, worst_class=0.95),
            Scores(0.97, robustness=ROBUST),
            True,
            "test",
            "beats",
        ),
        # Better on the test split but 3 points worse on noise: refused, and it says where.
        (
            Scores(0.98, robustness={**ROBUST, "noise": 0.84}, worst_class=0.95),
            Scores(0.97, robustness=ROBUST),
            False,
            "robustness",
            "on noise 0.8400 against 0.8700",
        ),
        # Losing within the tolerance is not refused.
        (
            Scores(0.98, robustness={**ROBUST, "noise": 0.86}, worst_class=0.95),
            Scores(0.97, robustness=ROBUST),
            True,
            "test",
            "beats",
        ),
        # Better overall, but one digit under the floor: refused.
        (
            Scores(0.98, robustness=ROBUST, worst_class=0.85),
            Scores(0.97, robustness=ROBUST),
            False,
            "worst class",
            "worst digit's test accuracy 0.8500 is below the floor of 0.9",
        ),
        # The recent rule gets the same check.
        (
            Scores(0.975, 0.95, 1000, {**ROBUST, "rotate": 0.85}, 0.95),
            Scores(0.979, 0.85, 1000, ROBUST),
            False,
            "robustness",
            "on rotate",
        ),
        # A first version is never refused: there is nothing else to serve.
        (Scores(0.5, robustness={"noise": 0.1}, worst_class=0.0), None, True, "first", "first"),
    ],
)
def test_the_gate_refuses_a_version_that_holds_up_worse(candidate, champion, eligible, rule, says):
    verdict = judge(candidate, champion, STRICT)
    assert (verdict.eligible, verdict.rule) == (eligible, rule)
    assert says in verdict.reason


def test_pipeline_registers_and_the_gate_moves_the_champion(workdir, config):
    # A default DVC remote, as the project has: the card names where its data is pushed.
    (workdir / ".dvc").mkdir()
    (workdir / ".dvc" / "config").write_text(
        "[core]\n    remote = storage\n['remote \"storage\"']\n    url = ../../storage\n"
    )
    fetch(config.data)
    preprocess(config)
    train(config)
    evaluate(config)

    client = MlflowClient()
    first = json.loads(REGISTRY_FILE.read_text())
    recorded_run_id = first.pop("run_id")
    assert first == {
        "version": 1,
        "promoted": True,
        "champion_version": 1,
        "reason": "first version: promoted to champion",
        "before": {},
    }
    version = client.get_model_version(MODEL, "1")
    run = client.search_runs([client.get_experiment_by_name("mnist").experiment_id])[0]
    assert version.tags["run_id"] == run.info.run_id == recorded_run_id
    assert version.tags["data.digest"] == run.data.tags["data.digest"]
    assert float(version.tags["test_accuracy"]) == pytest.approx(run.data.metrics["test_accuracy"])
    assert "trained for 2 epochs" in version.description
    assert run.data.tags["registry.version"] == "1"
    assert int(client.get_model_version_by_alias(MODEL, CHAMPION).version) == 1
    # Its model card, logged into the run and named in the description, holds
    # exactly what evaluate wrote to reports/ and what the run recorded.
    assert version.description.endswith(
        f"Model card: runs:/{run.info.run_id}/model_card/v1/model_card.md"
    )
    card = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/model_card/v1/model_card.json")
    metrics = json.loads(METRICS_FILE.read_text())
    measured = card["quantitative_analysis"]["performance_metrics"]
    assert {
        item["type"]: item["value"] for item in measured if item["slice"] in ("test", "recent")
    } == metrics
    per_class = json.loads(PER_CLASS_FILE.read_text())
    assert {item["slice"]: item["value"] for item in measured if "digit" in item["slice"]} == {
        f"test, digit {digit}": value for digit, value in per_class.items()
    }
    assert card["model_details"]["version"]["name"] == "1"
    # The robustness suite: in reports/metrics.json, the run, the model and the version's tags.
    for name in PERTURBATIONS:
        assert float(version.tags[f"robustness.{name}"]) == pytest.approx(
            metrics[f"robustness_{name}"], abs=1e-6
        )
        assert run.data.metrics[f"robustness_{name}"] == pytest.approx(
            metrics[f"robustness_{name}"]
        )
    assert float(version.tags["worst_class_accuracy"]) == pytest.approx(
        min(json.loads(PER_CLASS_FILE.read_text()).values()), abs=1e-6
    )
    fitted = json.loads((workdir / "reports" / "calibration.json").read_text())
    calibration = card["quantitative_analysis"]["calibration"]
    assert calibration["calibration_temperature"] == pytest.approx(fitted["temperature"])
    assert calibration["ece_after"] == pytest.approx(fitted["ece_after"])
    assert card["model_details"]["git"]["commit"] == version.tags["git.commit"]
    data = {item["name"]: item for item in card["model_parameters"]["data"]}
    assert data["processed splits"]["digest"] == run.data.tags["data.digest"]
    assert data["processed splits"]["dvc_md5"] == dvc_md5(PROCESSED_DATA_DIR)
    assert data["raw MNIST"]["sha256"] == run.data.params["data.content_sha256"]
    test_md5 = dvc_md5(processed_split_file("test"))
    assert data["mnist-test"] == {
        "name": "mnist-test",
        "link": "data/processed/test.npz",
        "dvc_md5": test_md5,
        "url": f"{workdir.parent / 'storage'}/files/md5/{test_md5[:2]}/{test_md5[2:]}",
    }
    assert card["model_details"]["mlflow_model_id"] == version.source.removeprefix("models:/")
    assert card["considerations"]["gate"]["reason"] == first["reason"]
    text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/model_card/v1/model_card.md")
    assert (
        text.startswith(f"# {MODEL} v1\n")
        and f"| test_accuracy | test | {metrics['test_accuracy']:.4f} |" in text
    )

    # Register the same classifier again under other accuracies to drive the gate.
    model_uri = version.source
    champion_accuracy = float(version.tags["test_accuracy"])
    worse = register(model_uri, MODEL, Scores(champion_accuracy - 0.01), Gate(), {}, "worse")
    assert (worse.version, worse.promoted, worse.champion_version) == (2, False, 1)
    assert "kept as challenger" in worse.reason
    assert int(client.get_model_version_by_alias(MODEL, CHALLENGER).version) == 2
    rejected = client.get_model_version(MODEL, "2")
    assert rejected.tags["promotion"].startswith("rejected")
    assert rejected.tags[GATE_TAG] == "failed" and rejected.tags["gate.champion"] == "1"
    assert "Gate: test rule" in rejected.description

    tie = register(model_uri, MODEL, Scores(champion_accuracy), Gate(), {}, "tie")
    assert not tie.promoted

    better = register(model_uri, MODEL, Scores(champion_accuracy + 0.001), Gate(), {}, "better")
    assert (better.version, better.promoted) == (4, True)
    assert int(client.get_model_version_by_alias(MODEL, CHAMPION).version) == 4

    margin = register(
        model_uri, MODEL, Scores(champion_accuracy + 0.002), Gate(margin=0.01), {}, "margin"
    )
    assert not margin.promoted

    # A stale writer (an evaluator that read before v4 existed) moves the alias
    # back to v1; the next reconciliation puts it on the best eligible version.
    client.set_registered_model_alias(MODEL, CHAMPION, "1")
    assert str(reconcile(client, MODEL).version) == "4"
    assert str(client.get_model_version_by_alias(MODEL, CHAMPION).version) == "4"
    # A version revoked by hand is out of the running.
    client.set_model_version_tag(MODEL, "4", GATE_TAG, REVOKED)
    assert str(reconcile(client, MODEL).version) == "1"

    champion = mlflow.pyfunc.load_model(f"models:/{MODEL}@{CHAMPION}")
    assert champion.metadata.get_input_schema().inputs[0].shape == (-1, 28, 28)

    # Every move, in order: the gate's two, the hand move found (not undone
    # silently: recorded, then the reconciliation's own), the revocation.
    moves = history.moves(client, MODEL)
    assert [(move.from_version, move.to_version, move.why) for move in moves] == [
        ("", "1", history.GATE),
        ("1", "4", history.GATE),
        ("4", "1", history.BY_HAND),
        ("1", "4", history.RECONCILIATION),
        ("4", "1", history.REVOKED),
    ]
    assert moves[1].rule == client.get_model_version(MODEL, "4").tags["gate.rule"]
    assert moves[1].scores["test_accuracy"] == f"{champion_accuracy + 0.001:.6f}"
    assert moves[2].by.startswith("unknown (found by ")
    assert [move.when_ms for move in moves] == sorted(move.when_ms for move in moves)
    # The command prints the same, from a shell on the project's store.
    printed = registry_history(workdir).stdout.splitlines()
    assert len(printed) == 5 and "(none) -> v1  gate" in printed[0]
    assert "v4 -> v1  by hand" in printed[2] and "v4 -> v1  revoked" in printed[4]
    as_json = registry_history(workdir, "--json").stdout.splitlines()
    assert [json.loads(line)["to_version"] for line in as_json] == ["1", "4", "1", "4", "1"]


def registry_history(project, *extra: str) -> subprocess.CompletedProcess:
    """`mnist-mlops registry history` from a shell on the project's store."""
    command = [sys.executable, "-m", "mnist_mlops", "registry", "history", *extra]
    return subprocess.run(
        command, cwd=project, env=subprocess_env(), capture_output=True, text=True
    )


def test_registry_history_says_what_is_missing(workdir):
    missing = registry_history(workdir)
    assert missing.returncode == 1 and "no MLflow store at" in missing.stderr
    assert not (workdir / "mlflow.db").exists()
    MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").search_experiments()
    empty = registry_history(workdir, "--model", "other")
    assert empty.returncode == 1 and "no move of other@champion recorded yet" in empty.stderr


def test_a_first_champion_set_by_two_evaluators_at_once_is_not_an_error(workdir):
    """MLflow's store sets an alias by read, then insert: a writer between the two loses on the key.

    Another connection inserts the alias row just before this client's insert,
    as a second evaluator finishing at the same moment does; the gate retries
    and ends with the alias on the best version, not with the store's error.
    """
    import sqlalchemy

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    client.create_registered_model(MODEL)
    run = client.create_run(client.create_experiment("race"))
    client.log_text(run.info.run_id, "flavors: {}\n", "model/MLmodel")
    for accuracy in ("0.900000", "0.950000"):
        client.create_model_version(
            MODEL,
            f"runs:/{run.info.run_id}/model",
            run_id=run.info.run_id,
            tags={GATE_TAG: "passed", "gate.champion": "0", "test_accuracy": accuracy},
        )
    other = sqlalchemy.create_engine(uri)
    raced = []

    @sqlalchemy.event.listens_for(
        client._get_registry_client().store.engine, "before_cursor_execute"
    )
    def insert_first(connection, cursor, statement, parameters, context, executemany):
        if statement.upper().startswith("INSERT INTO REGISTERED_MODEL_ALIASES") and not raced:
            raced.append(parameters)
            with other.begin() as rival:
                rival.exec_driver_sql(statement, parameters)

    try:
        assert str(reconcile(client, MODEL).version) == "2"
    finally:
        sqlalchemy.event.remove(
            client._get_registry_client().store.engine, "before_cursor_execute", insert_first
        )
        other.dispose()
    assert raced, "the rival insert ran before the client's own"
    assert str(client.get_model_version_by_alias(MODEL, CHAMPION).version) == "2"
