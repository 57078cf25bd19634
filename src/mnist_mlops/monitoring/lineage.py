"""`mnist-mlops lineage`: from a served request, or a registered version, back to its code and data.

For a request id (the server's `X-Request-ID`, or the client's own id) it
reads the inference log for the version that answered, then joins what the
project recorded elsewhere: the version's run (git commit and dirty flag,
parameters, the digests of the raw and processed data it trained and was
tested on), its LoggedModel id, the gate's decision, the true digits sent
back and whether the feedback snapshot holds them, and the champion's
history around the moment of the answer (tracking/history.py).

The log is searched by its request ids alone: each file's id columns are
read, and the rest of a file only when it holds the request.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from mnist_mlops.monitoring.log_files import ROWS, log_files, read_feedback
from mnist_mlops.paths import FEEDBACK_SNAPSHOT_FILE, PROCESSED_DATA_DIR, RAW_DATA_DIR
from mnist_mlops.tracking.datasets import DVC_FOLDERS, run_datasets


class LineageError(Exception):
    """What cannot be traced, in one line."""


def find_request(log_dir: Path | str, request_id: str) -> dict | None:
    """The logged answer to `request_id` (the server's id or the client's), or None."""
    for file in log_files(log_dir, ROWS):
        with np.load(io.BytesIO(file.read()), allow_pickle=False) as archive:
            hit = archive["request_id"] == request_id
            if not hit.any() and "client_request_id" in archive.files:
                hit = archive["client_request_id"] == request_id
            if not hit.any():
                continue
            order = np.argsort(archive["position"][hit])
            times = archive["time"][hit]
            return {
                "request_id": str(archive["request_id"][hit][0]),
                "client_request_id": str(archive["client_request_id"][hit][0])
                if "client_request_id" in archive.files
                else "",
                "answered_at": _moment(float(times.min())),
                "answered_at_s": float(times.min()),
                "model_name": str(archive["model_name"]),
                "model_version": str(archive["model_version"]),
                "images": int(hit.sum()),
                "digits": archive["digit"][hit][order].astype(int).tolist(),
                "log_file": file.name,
            }
    return None


def feedback_of(log_dir: Path | str, snapshot: Path, request_id: str, images: int) -> dict:
    """The true digits sent back for a request, and how many of them the snapshot holds."""
    truth = read_feedback(log_dir)
    digits = [truth.get((request_id, position)) for position in range(images)]
    in_snapshot = 0
    if snapshot.is_file():
        with np.load(snapshot, allow_pickle=False) as archive:
            in_snapshot = int((archive["request_id"] == request_id).sum())
    return {"true_digits": digits, "snapshot": str(snapshot), "images_in_snapshot": in_snapshot}


def version_lineage(client, model_name: str, version: str) -> dict:
    """What a registered version was made from, and what the gate decided."""
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_model_version(model_name, version)
    except MlflowException:
        raise LineageError(f"{model_name} has no version {version}") from None
    tags = registered.tags
    run = client.get_run(registered.run_id) if registered.run_id else None
    params = run.data.params if run else {}
    run_tags = run.data.tags if run else {}
    source = registered.source or ""
    return {
        "model_name": model_name,
        "version": str(registered.version),
        "registered_at": _moment(registered.creation_timestamp / 1000),
        "model_id": source.removeprefix("models:/") if source.startswith("models:/m-") else "",
        "run_id": registered.run_id or "",
        "git_commit": run_tags.get("git.commit", tags.get("git.commit", "")),
        "git_dirty": run_tags.get("git.dirty", ""),
        "data": {
            "processed": {
                "path": PROCESSED_DATA_DIR.as_posix(),
                "digest": run_tags.get("data.digest", tags.get("data.digest", "")),
            },
            "raw": {
                "path": RAW_DATA_DIR.as_posix(),
                "content_sha256": params.get("data.content_sha256", ""),
                "files_sha256": {
                    key.removeprefix("data.sha256."): value
                    for key, value in params.items()
                    if key.startswith("data.sha256.")
                },
                "source": params.get("data.source", ""),
            },
            "feedback": {
                "path": FEEDBACK_SNAPSHOT_FILE.as_posix(),
                "weight": params.get("feedback.weight", ""),
                "recent_fraction": params.get("feedback.recent_fraction", ""),
            },
            "dvc_md5": {
                name: run_tags[f"data.dvc.{name}"]
                for name in DVC_FOLDERS
                if f"data.dvc.{name}" in run_tags
            },
            "datasets": run_datasets(run) if run else [],
        },
        "params": {
            key: value
            for key, value in sorted(params.items())
            if not key.startswith(("data.", "mlflow."))
        },
        "metrics": {
            key: tags[key]
            for key in ("test_accuracy", "recent_accuracy", "recent_examples")
            if key in tags
        },
        "gate": {
            "verdict": tags.get("gate", ""),
            "rule": tags.get("gate.rule", ""),
            "reason": tags.get("gate.reason", ""),
            "judged_against": tags.get("gate.champion", ""),
        },
    }


def champion_around(moves: list, moment_s: float) -> dict:
    """Who held `champion` at a moment, and the moves just before and after it."""
    moment_ms = moment_s * 1000
    before = [move for move in moves if move.when_ms <= moment_ms]
    after = [move for move in moves if move.when_ms > moment_ms]
    return {
        "champion_then": before[-1].to_version if before else "",
        "move_before": before[-1].line() if before else "",
        "move_after": after[0].line() if after else "",
    }


def render(lineage: dict) -> str:
    """The lineage as text, a line per fact."""
    lines = []
    request = lineage.get("request")
    if request:
        client_id = request["client_request_id"]
        lines += [
            f"request {request['request_id']}" + (f" (client id {client_id})" if client_id else ""),
            f"  answered at {request['answered_at']} by "
            f"{request['model_name']} v{request['model_version']}: "
            f"{request['images']} image(s), digits {request['digits']} ({request['log_file']})",
        ]
        feedback = lineage["feedback"]
        lines.append(
            f"  true digits {feedback['true_digits']}; "
            f"{feedback['images_in_snapshot']} of its images in {feedback['snapshot']}"
        )
        around = lineage["champion"]
        lines.append(f"  champion then: v{around['champion_then'] or '?'}")
        for key in ("move_before", "move_after"):
            if around[key]:
                lines.append(f"  {key.replace('_', ' ')}: {around[key]}")
    version = lineage["version"]
    data, gate = version["data"], version["gate"]
    dirty = " (uncommitted changes)" if version["git_dirty"] == "true" else ""
    lines += [
        f"{version['model_name']} v{version['version']}, registered {version['registered_at']}",
        f"  model id {version['model_id'] or '-'}, run {version['run_id'] or '-'}",
        f"  git commit {version['git_commit'] or '-'}{dirty}",
        f"  processed data {data['processed']['digest'] or '-'} ({data['processed']['path']})",
        f"  raw data {data['raw']['content_sha256'] or '-'} ({data['raw']['path']}, "
        f"from {data['raw']['source'] or '-'})",
        f"  feedback {data['feedback']['path']} (weight {data['feedback']['weight'] or '-'})",
        *(
            f"  DVC {DVC_FOLDERS[name].as_posix()} {md5}"
            for name, md5 in data.get("dvc_md5", {}).items()
        ),
        *(
            f"  dataset {item['name']} {item['dvc_md5']} ({item['link']})"
            for item in data.get("datasets", [])
        ),
        "  params " + ", ".join(f"{key}={value}" for key, value in version["params"].items()),
        "  metrics " + ", ".join(f"{key} {value}" for key, value in version["metrics"].items()),
        f"  gate: {gate['verdict'] or '-'} ({gate['rule'] or '-'}: {gate['reason'] or '-'}), "
        f"judged against v{gate['judged_against'] or '0'}",
    ]
    return "\n".join(lines)


def _moment(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
