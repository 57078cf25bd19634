"""A model card per registered version, written at evaluate: JSON for machines, Markdown for people.

The sections follow Google's model-card-toolkit schema (model details,
considerations with the intended use and limitations, model parameters with
the data, quantitative analysis), filled from what the evaluation knows:
the version and its run, the commit, the data digests, the metrics overall,
per class and on the recent split, the gate's decision, and what the
monitor's reference was made from. Both files are logged into the version's
run (`model_card/vN/`) and linked from the version's description.
"""

from __future__ import annotations

import json

from mnist_mlops.paths import FEEDBACK_DATA_DIR, PROCESSED_DATA_DIR, RAW_DATA_DIR
from mnist_mlops.tracking.datasets import run_datasets

CARD_DIR = "model_card"
INTENDED_USE = (
    "Classifying 28×28 grayscale images of one handwritten digit (0–9), white on black, "
    "pixels 0–255, as MNIST has them."
)
LIMITATIONS = (
    "Trained on MNIST's digits only: strokes much thicker or thinner, noise, shifted or "
    "rotated digits, and anything that is not a single centred digit lower its accuracy "
    "(the robustness_* metrics measure by how much; the monitor's drift checks watch for "
    "that traffic). It serves the softmax's "
    "probabilities, which are over-confident; the monitor calibrates them by the temperature "
    "under Metrics before it estimates accuracy from them."
)


def model_card(
    config, run, registration, metrics: dict, per_class: dict, reference: str, model_id: str = ""
) -> dict:
    """The card of the version `registration` (LoggedModel `model_id`) made from `run`."""
    tags, params = run.data.tags or {}, run.data.params or {}
    return {
        "schema_version": "0.0.2",
        "model_details": {
            "name": registration.model_name,
            "version": {"name": str(registration.version)},
            "overview": (
                f"{config.model_name} trained for {config.train.epochs} epochs, "
                f"served by {config.serving.runtime}"
            ),
            "references": [{"reference": f"runs:/{run.info.run_id}"}],
            "git": {
                "commit": tags.get("git.commit", "unknown"),
                "dirty": tags.get("git.dirty", ""),
            },
            "mlflow_run_id": run.info.run_id,
            "mlflow_model_id": model_id,
        },
        "model_parameters": {
            "model_architecture": config.model_name,
            "parameters": {
                key: value
                for key, value in sorted(params.items())
                if key.startswith(("model.", "optimizer.", "train."))
            },
            "data": card_data(run),
        },
        "quantitative_analysis": {
            "performance_metrics": [
                {"type": name, "value": value, "slice": _slice(name)}
                for name, value in sorted(metrics.items())
            ]
            + [
                {"type": "accuracy", "value": value, "slice": f"test, digit {digit}"}
                for digit, value in sorted(per_class.items())
            ],
            "calibration": {
                key: value
                for key, value in (run.data.metrics or {}).items()
                if key in ("calibration_temperature", "ece_before", "ece_after")
            },
        },
        "considerations": {
            "use_cases": [{"description": INTENDED_USE}],
            "limitations": [{"description": LIMITATIONS}],
            "monitoring_reference": reference,
            "gate": {
                "promoted": registration.promoted,
                "champion_version": registration.champion_version,
                "reason": registration.reason,
            },
        },
    }


def card_data(run) -> list[dict]:
    """The data the version was trained and measured on, with DVC's hashes (tracking/datasets.py).

    The folders as dvc.lock records them, then each dataset the run logged.
    """
    tags, params = run.data.tags or {}, run.data.params or {}
    folders = [
        {
            "name": "raw MNIST",
            "link": RAW_DATA_DIR.as_posix(),
            "dvc_md5": tags.get("data.dvc.raw", ""),
            "sha256": params.get("data.content_sha256", ""),
            "source": params.get("data.source", ""),
        },
        {
            "name": "processed splits",
            "link": PROCESSED_DATA_DIR.as_posix(),
            "dvc_md5": tags.get("data.dvc.processed", ""),
            "digest": tags.get("data.digest", ""),
        },
        {
            "name": "feedback",
            "link": FEEDBACK_DATA_DIR.as_posix(),
            "dvc_md5": tags.get("data.dvc.feedback", ""),
            "weight": params.get("feedback.weight", ""),
        },
    ]
    return folders + run_datasets(run)


def markdown(card: dict) -> str:
    """The card for people."""
    details, parameters = card["model_details"], card["model_parameters"]
    considerations = card["considerations"]
    gate = considerations["gate"]
    lines = [
        f"# {details['name']} v{details['version']['name']}",
        "",
        details["overview"] + ".",
        "",
        "## Model details",
        "",
        f"- MLflow run: `{details['mlflow_run_id']}`",
        f"- MLflow model: `models:/{details['mlflow_model_id']}`",
        f"- git commit: `{details['git']['commit']}`"
        + (" (with uncommitted changes)" if details["git"]["dirty"] == "true" else ""),
        "",
        "## Parameters",
        "",
        *(f"- `{key}`: {value}" for key, value in parameters["parameters"].items()),
        "",
        "## Data",
        "",
        *(
            f"- {item['name']} (`{item['link']}`): "
            + ", ".join(
                f"{key} `{value}`"
                for key, value in item.items()
                if key not in ("name", "link") and value not in ("", None)
            )
            for item in parameters["data"]
        ),
        "",
        "## Metrics",
        "",
        "| metric | slice | value |",
        "|---|---|---:|",
        *(
            f"| {metric['type']} | {metric['slice']} | {_number(metric['value'])} |"
            for metric in card["quantitative_analysis"]["performance_metrics"]
        ),
        "",
        "Calibration on the validation split: "
        + ", ".join(
            f"{key} {_number(value)}"
            for key, value in card["quantitative_analysis"]["calibration"].items()
        )
        + ".",
        "",
        "## Intended use",
        "",
        considerations["use_cases"][0]["description"],
        "",
        "## Limitations",
        "",
        considerations["limitations"][0]["description"]
        + f" The monitor's reference is its {considerations['monitoring_reference']} split.",
        "",
        "## The gate",
        "",
        f"{gate['reason']}.",
        "",
    ]
    return "\n".join(lines)


def log_card(client, card: dict, run_id: str) -> str:
    """Log the card's JSON and Markdown into the run; return the Markdown's artifact URI.

    Under the version's own folder: a run evaluated again registers another version.
    """
    folder = f"{CARD_DIR}/v{card['model_details']['version']['name']}"
    client.log_text(run_id, json.dumps(card, indent=2, sort_keys=True), f"{folder}/model_card.json")
    client.log_text(run_id, markdown(card), f"{folder}/model_card.md")
    return f"runs:/{run_id}/{folder}/model_card.md"


def link_card(client, registration, uri: str) -> None:
    """Name the card in the version's description."""
    version = client.get_model_version(registration.model_name, str(registration.version))
    description = f"{version.description or ''} Model card: {uri}".strip()
    client.update_model_version(registration.model_name, str(registration.version), description)


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _slice(metric: str) -> str:
    """The split a metric was measured on (the robustness suite perturbs the test split)."""
    return "recent" if metric.startswith("recent") else "test"
