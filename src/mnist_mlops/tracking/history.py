"""The champion's history: every move of `@champion`, recorded append-only in the tracking store.

MLflow keeps only where an alias points now. Each move the project makes is
recorded as a finished run of its own, with tags and no artifacts, in the
experiment `MODEL champion history` of the same tracking store (so it lives
as long as the store, on the team's server when there is one, and survives
the server's restart). A run is never edited after it is written, and two
evaluators recording at once write two runs: nothing is lost to a race.

A record says when, from which version to which, why (`gate`: a new version
passed and outranks the champion; `reconciliation`: another evaluator's
version outranks the one that held it; `revoked`: the holder was tagged
`gate: revoked`; `by hand`: moved outside the project), by which rule, by
whom, and the scores the new champion was judged on.

A move made outside the project (the MLflow UI, a script) is found at the
next reconciliation: the alias is not where the last record left it. It is
recorded as `by hand` before the reconciliation moves the alias again (and
records that move too), so nothing is undone silently. Between an
evaluator's write of the alias and its record, another evaluator can see
the alias ahead of the history; it looks again after RECORD_SECONDS before
it calls the move a hand's.
"""

from __future__ import annotations

import getpass
import json
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mnist_mlops.paths import MLFLOW_ARTIFACTS_NAME
from mnist_mlops.tracking.store import NOTE_TAG

PREFIX = "champion."
GATE, RECONCILIATION, REVOKED, BY_HAND = "gate", "reconciliation", "revoked", "by hand"
# The champion a store already had when its history began.
FOUND = "found"
# Longer than an evaluator's write of the alias and its record take, even on a slow server.
RECORD_SECONDS = 2.0
SCORES = ("test_accuracy", "recent_accuracy", "recent_examples", "gate.champion")
NOTE = (
    "Every move of the alias `champion`, one run each, recorded by mnist-mlops (the gate, "
    "reconciliation, a revoked version, a move by hand found later). Append-only: never edit "
    "or delete these runs. `mnist-mlops registry history` prints them."
)


@dataclass(frozen=True)
class Move:
    """One move of the alias: `from_version` is "" for the first champion."""

    when_ms: int
    from_version: str
    to_version: str
    why: str
    rule: str
    by: str
    scores: dict

    def line(self) -> str:
        moment = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.when_ms / 1000))
        source = f"v{self.from_version}" if self.from_version else "(none)"
        scores = ", ".join(f"{key} {value}" for key, value in self.scores.items())
        rule = f" ({self.rule})" if self.rule else ""
        return f"{moment}  {source} -> v{self.to_version}  {self.why}{rule}  by {self.by}" + (
            f"  [{scores}]" if scores else ""
        )


def experiment_name(model_name: str) -> str:
    return f"{model_name} champion history"


def who() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def record(client, model_name: str, move: Move) -> None:
    """Append one move: a finished run with the move in its tags."""
    tags = {f"{PREFIX}{key}": str(value) for key, value in asdict(move).items() if key != "scores"}
    tags[f"{PREFIX}scores"] = json.dumps(move.scores, sort_keys=True)
    run = client.create_run(
        _experiment(client, model_name),
        start_time=move.when_ms,
        tags=tags,
        run_name=f"v{move.from_version or '0'} -> v{move.to_version}",
    )
    client.set_terminated(run.info.run_id, "FINISHED", end_time=move.when_ms)


def moves(client, model_name: str) -> list[Move]:
    """Every recorded move, oldest first."""
    experiment = client.get_experiment_by_name(experiment_name(model_name))
    if experiment is None:
        return []
    found, token = [], None
    while True:
        page = client.search_runs(
            [experiment.experiment_id],
            order_by=["attributes.start_time ASC"],
            max_results=1000,
            page_token=token,
        )
        found.extend(_move(run) for run in page if f"{PREFIX}to_version" in run.data.tags)
        token = page.token
        if not token:
            return sorted(found, key=lambda move: move.when_ms)


def moved(holder, best, registered: int | None) -> Move:
    """The record of a move of the alias from `holder` (None: no champion yet) to `best`."""
    if holder is None or registered == int(best.version):
        why = GATE
    elif holder.tags.get("gate") == "revoked":
        why = REVOKED
    else:
        why = RECONCILIATION
    scores = {key: best.tags[key] for key in SCORES if key in best.tags}
    return Move(
        when_ms=int(time.time() * 1000),
        from_version=str(holder.version) if holder is not None else "",
        to_version=str(best.version),
        why=why,
        rule=best.tags.get("gate.rule", ""),
        by=who(),
        scores=scores,
    )


def find_hand_move(client, model_name: str, holder_version: str | None, reread) -> Move | None:
    """The move by hand that put the alias on `holder_version`, if the history says otherwise.

    `reread()` reads the alias again: an evaluator between its write and its
    record is given RECORD_SECONDS to record. With no history yet, the
    holder is recorded as `found`: the champion a store had before.
    """
    last = moves(client, model_name)
    expected = last[-1].to_version if last else None
    if holder_version is None or holder_version == expected:
        return None
    if not last:
        return Move(
            when_ms=int(time.time() * 1000),
            from_version="",
            to_version=holder_version,
            why=FOUND,
            rule="the champion when the history began",
            by=who(),
            scores={},
        )
    time.sleep(RECORD_SECONDS)
    last, holder_version = moves(client, model_name), reread()
    expected = last[-1].to_version if last else None
    if holder_version is None or holder_version == expected:
        return None
    return Move(
        when_ms=int(time.time() * 1000),
        from_version=expected or "",
        to_version=holder_version,
        why=BY_HAND,
        rule="outside mnist-mlops, found at reconciliation",
        by=f"unknown (found by {who()})",
        scores={},
    )


def _move(run) -> Move:
    tags = run.data.tags
    return Move(
        when_ms=int(tags[f"{PREFIX}when_ms"]),
        from_version=tags.get(f"{PREFIX}from_version", ""),
        to_version=tags[f"{PREFIX}to_version"],
        why=tags.get(f"{PREFIX}why", ""),
        rule=tags.get(f"{PREFIX}rule", ""),
        by=tags.get(f"{PREFIX}by", ""),
        scores=json.loads(tags.get(f"{PREFIX}scores", "{}")),
    )


def _experiment(client, model_name: str) -> str:
    import mlflow
    from mlflow.exceptions import MlflowException

    name = experiment_name(model_name)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # Runs without artifacts; a SQLite store's location stays beside its database,
    # as the project's own experiment's does (not ./mlruns wherever this runs).
    uri, location = mlflow.get_tracking_uri(), None
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
        location = (database.parent / MLFLOW_ARTIFACTS_NAME).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags={NOTE_TAG: NOTE})
    except MlflowException:  # another evaluator created it after the lookup
        return client.get_experiment_by_name(name).experiment_id
