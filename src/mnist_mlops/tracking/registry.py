"""The model registry: every evaluated model is registered; the best eligible one is `champion`.

`judge` is the promotion gate; `register` records its verdict with the new
version and then calls `reconcile` (promotion.py), which points `champion` at
the best eligible version whatever order evaluators ran in. A version that
fails the gate gets the alias `challenger` and a tag saying why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mnist_mlops.tracking.promotion import (
    CHAMPION,  # noqa: F401 (the registry's readers take the alias's name from here)
    FAILED,
    GATE_TAG,
    PASSED,
    current_champion,
    reconcile,
    set_alias,
)

CHALLENGER = "challenger"
ROBUSTNESS_TAG = "robustness."
REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def registered_version(model_uri: str):
    """The registry's ModelVersion behind `models:/NAME@ALIAS` or `models:/NAME/N`; None otherwise.

    Resolving an alias once, and then loading that version, keeps what is
    served and what is reported about it the same version.
    """
    match = REGISTERED.match(model_uri)
    if not match:
        return None
    from mlflow import MlflowClient

    client = MlflowClient()
    if match["alias"]:
        return client.get_model_version_by_alias(match["name"], match["alias"])
    return client.get_model_version(match["name"], match["version"])


def should_promote(candidate: float, champion: float | None, margin: float) -> bool:
    """The test rule: no champion yet, or the candidate beats it by more than `margin`."""
    return champion is None or candidate - champion > margin


@dataclass(frozen=True)
class Scores:
    """A version's accuracy on the test split and, when there is one, on the recent split;
    on each perturbation of the robustness suite (pipeline/robustness.py); and the test
    accuracy of the digit it answers worst."""

    test_accuracy: float
    recent_accuracy: float | None = None
    recent_examples: int = 0
    robustness: dict[str, float] | None = None
    worst_class: float | None = None


@dataclass(frozen=True)
class Gate:
    margin: float = 0.0
    test_tolerance: float = 0.005
    robustness_tolerance: float = 1.0
    worst_class_floor: float = 0.0


@dataclass(frozen=True)
class Verdict:
    eligible: bool
    rule: str
    reason: str


def judge(candidate: Scores, champion: Scores | None, gate: Gate) -> Verdict:
    """The promotion gate: may `candidate` replace `champion` (both scored on the same splits)?

    With a recent split (served traffic with true digits, newest first), the
    candidate must beat the champion there by more than the margin and lose at
    most `test_tolerance` on the test split. Without one, it must beat the
    champion's test_accuracy by more than the margin.
    """
    if champion is None:
        return Verdict(True, "first", "first version")
    test, best = candidate.test_accuracy, champion.test_accuracy
    if candidate.recent_accuracy is None or champion.recent_accuracy is None:
        beats = should_promote(test, best, gate.margin)
        verb = "beats" if beats else "does not beat"
        verdict = Verdict(
            beats,
            "test",
            f"test rule: test_accuracy {test:.4f} {verb} the champion's {best:.4f} "
            f"by more than {gate.margin:g}",
        )
        return held_up(verdict, candidate, champion, gate)
    recent, recent_best = candidate.recent_accuracy, champion.recent_accuracy
    gains = recent - recent_best > gate.margin
    keeps = test >= best - gate.test_tolerance
    verdict = Verdict(
        gains and keeps,
        "recent",
        f"recent rule: on {candidate.recent_examples} recent images {recent:.4f} "
        f"{'beats' if gains else 'does not beat'} the champion's {recent_best:.4f} "
        f"by more than {gate.margin:g}, and test_accuracy {test:.4f} "
        f"{'is' if keeps else 'is not'} within {gate.test_tolerance:g} of its {best:.4f}",
    )
    return held_up(verdict, candidate, champion, gate)


def held_up(verdict: Verdict, candidate: Scores, champion: Scores, gate: Gate) -> Verdict:
    """A version the rules would promote is still refused when its worst digit is below the
    floor, or when it loses more than the tolerance to the champion on any perturbation of
    the robustness suite (both scored on the same images). The first version is never
    refused: there is nothing else to serve."""
    if not verdict.eligible:
        return verdict
    if candidate.worst_class is not None and candidate.worst_class < gate.worst_class_floor:
        return Verdict(
            False,
            "worst class",
            f"{verdict.reason}, but its worst digit's test accuracy {candidate.worst_class:.4f} "
            f"is below the floor of {gate.worst_class_floor:g}",
        )
    theirs = champion.robustness or {}
    losses = {
        name: theirs[name] - value
        for name, value in (candidate.robustness or {}).items()
        if name in theirs and theirs[name] - value > gate.robustness_tolerance
    }
    if losses:
        worst = max(losses, key=losses.get)
        return Verdict(
            False,
            "robustness",
            f"{verdict.reason}, but it loses more than {gate.robustness_tolerance:g} to the "
            f"champion on {', '.join(sorted(losses))} (on {worst} "
            f"{candidate.robustness[worst]:.4f} against {theirs[worst]:.4f})",
        )
    return verdict


@dataclass(frozen=True)
class Registration:
    model_name: str
    version: int
    promoted: bool
    champion_version: int
    reason: str


def recorded_scores(version) -> Scores:
    """The scores a version was registered with (its tags)."""
    recent, worst = version.tags.get("recent_accuracy"), version.tags.get("worst_class_accuracy")
    robustness = {
        key.removeprefix(ROBUSTNESS_TAG): float(value)
        for key, value in version.tags.items()
        if key.startswith(ROBUSTNESS_TAG)
    }
    return Scores(
        float(version.tags["test_accuracy"]),
        float(recent) if recent else None,
        int(version.tags.get("recent_examples", 0)),
        robustness or None,
        float(worst) if worst else None,
    )


def register(
    model_uri: str,
    model_name: str,
    scores: Scores,
    gate: Gate,
    tags: dict[str, str],
    description: str,
    champion: tuple | None = None,
) -> Registration:
    """Register `model_uri` as a new version of `model_name`, judge it, and reconcile `champion`.

    `champion` is the (version, Scores) the candidate was compared with, scored
    by the caller on the candidate's own splits; by default the current champion
    and its recorded scores. The verdict is written as tags in the same call
    that creates the version, so every reader sees a version with its verdict.
    """
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    if champion is None:
        held = current_champion(client, model_name)
        champion = (held, recorded_scores(held)) if held else (None, None)
    held, held_scores = champion
    verdict = judge(scores, held_scores, gate)
    version_tags = {
        **tags,
        "test_accuracy": f"{scores.test_accuracy:.6f}",
        "recent_examples": str(scores.recent_examples),
        GATE_TAG: PASSED if verdict.eligible else FAILED,
        "gate.champion": str(held.version) if held else "0",
        "gate.rule": verdict.rule,
        "gate.reason": verdict.reason,
    }
    if scores.recent_accuracy is not None:
        version_tags["recent_accuracy"] = f"{scores.recent_accuracy:.6f}"
    for name, value in (scores.robustness or {}).items():
        version_tags[f"{ROBUSTNESS_TAG}{name}"] = f"{value:.6f}"
    if scores.worst_class is not None:
        version_tags["worst_class_accuracy"] = f"{scores.worst_class:.6f}"
    created = mlflow.register_model(model_uri, model_name, tags=version_tags)
    version = int(created.version)
    client.update_model_version(
        model_name, created.version, description=f"{description} Gate: {verdict.reason}."
    )
    if not verdict.eligible:
        set_alias(client, model_name, CHALLENGER, created.version)
        client.set_model_version_tag(
            model_name, created.version, "promotion", f"rejected: {verdict.reason}"
        )
    winner = reconcile(client, model_name, registered=version)
    promoted = int(winner.version) == version
    if promoted:
        client.set_model_version_tag(model_name, created.version, "promotion", "promoted")
    if promoted:
        reason = f"{verdict.reason}: promoted to champion"
    elif verdict.eligible:
        reason = f"{verdict.reason}, but v{winner.version} is better: it stays champion"
    else:
        reason = f"{verdict.reason}: kept as challenger; v{winner.version} stays champion"
    return Registration(model_name, version, promoted, int(winner.version), reason)
