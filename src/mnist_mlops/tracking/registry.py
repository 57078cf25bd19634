"""The model registry: every evaluated model is registered; the best is `champion`.

The gate is `should_promote`; `register` applies it. A version that does not
beat the champion gets the alias `challenger` and a tag saying why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CHAMPION = "champion"
CHALLENGER = "challenger"
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
    """Promote when there is no champion yet, or the candidate beats it by more than `margin`."""
    return champion is None or candidate - champion > margin


@dataclass(frozen=True)
class Registration:
    model_name: str
    version: int
    promoted: bool
    champion_version: int
    reason: str


def current_champion(client, model_name: str):
    """The version that holds the alias `champion`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def register(
    model_uri: str,
    model_name: str,
    test_accuracy: float,
    margin: float,
    tags: dict[str, str],
    description: str,
) -> Registration:
    """Register `model_uri` as a new version of `model_name` and apply the promotion gate."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    version_tags = {**tags, "test_accuracy": f"{test_accuracy:.6f}"}
    created = mlflow.register_model(model_uri, model_name, tags=version_tags)
    version = int(created.version)
    client.update_model_version(model_name, created.version, description=description)

    champion = current_champion(client, model_name)
    champion_accuracy = float(champion.tags["test_accuracy"]) if champion else None
    if should_promote(test_accuracy, champion_accuracy, margin):
        client.set_registered_model_alias(model_name, CHAMPION, created.version)
        if champion is None:
            reason = "first version: promoted to champion"
        else:
            reason = (
                f"test_accuracy {test_accuracy:.4f} beats champion v{champion.version} "
                f"({champion_accuracy:.4f}) by more than {margin:g}: promoted to champion"
            )
        client.set_model_version_tag(model_name, created.version, "promotion", "promoted")
        return Registration(model_name, version, True, version, reason)

    reason = (
        f"test_accuracy {test_accuracy:.4f} does not beat champion v{champion.version} "
        f"({champion_accuracy:.4f}) by more than {margin:g}: kept as challenger"
    )
    client.set_registered_model_alias(model_name, CHALLENGER, created.version)
    client.set_model_version_tag(model_name, created.version, "promotion", f"rejected: {reason}")
    return Registration(model_name, version, False, int(champion.version), reason)
