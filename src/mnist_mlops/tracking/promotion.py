"""Promotion as reconciliation: `champion` ends on the best eligible version, whatever the order.

MLflow has no compare-and-set on an alias, so two evaluators that each read
the champion and then move the alias can leave the worse one last. Instead:

1. Each version is registered with its gate verdict in the same call that
   creates it (`gate: passed|failed`, the champion it was judged against,
   its scores). Versions are never edited afterwards, so the set of eligible
   versions only grows, and each one's rank never changes.
2. `rank` orders eligible versions totally, from their tags alone: first by
   the champion they were judged against (a version that beat a later
   champion outranks one that beat an earlier one), then by recent accuracy
   (versions judged on recent traffic first), then test accuracy, then the
   older version wins a tie.
3. `reconcile` reads every eligible version, computes the best, points the
   alias at it if it is not there, and repeats until a read finds the alias
   already on the best.

Why it converges (reads and writes go to one database, so they happen in
one order): take the last write to the alias, of version B, by evaluator E.
E's last step is a read after that write which found the alias on the best
of the versions it saw, so B is the best of every version registered before
that read. A version V registered after it is read by its own evaluator only
after the last write: that evaluator sees the alias on B and V in its set,
and had V ranked above B it would have written again, which no one did. So
B is the best of all the versions registered. Retries end once
registrations stop: evaluators who see the same versions compute the same
best and never undo each other.

A version is taken out of the running by hand with the tag `gate: revoked`;
the next evaluation moves the alias off it. Every move is recorded in the
champion's history (history.py).
"""

from __future__ import annotations

CHAMPION = "champion"
GATE_TAG = "gate"
PASSED, FAILED, REVOKED = "passed", "failed", "revoked"
# More evaluators than this racing at once is not a team's registry.
RECONCILE_ATTEMPTS = 20
# A lost insert leaves the row in place, so the second write is an update.
ALIAS_WRITE_ATTEMPTS = 3


def eligible(version) -> bool:
    """A version that passed the gate; before verdict tags, a version that was promoted."""
    verdict = version.tags.get(GATE_TAG)
    if verdict is None:
        return version.tags.get("promotion") == "promoted"
    return verdict == PASSED


def rank(version) -> tuple:
    """The order of eligible versions: the larger, the better (see the module's text)."""
    recent = version.tags.get("recent_accuracy")
    return (
        int(version.tags.get("gate.champion", 0)),
        recent is not None,
        float(recent) if recent is not None else 0.0,
        float(version.tags.get("test_accuracy", 0.0)),
        -int(version.version),
    )


def all_versions(client, model_name: str) -> list:
    versions, token = [], None
    while True:
        page = client.search_model_versions(
            f"name = '{model_name}'", max_results=1000, page_token=token
        )
        versions.extend(page)
        token = page.token
        if not token:
            return versions


def best_eligible(client, model_name: str):
    """The eligible version of highest rank, or None when there is none."""
    candidates = [version for version in all_versions(client, model_name) if eligible(version)]
    return max(candidates, key=rank, default=None)


def lost_insert_race(error) -> bool:
    """The store's key refused an alias row that another writer inserted first."""
    text = str(error).lower()
    return "unique constraint" in text or "duplicate" in text


def set_alias(client, model_name: str, alias: str, version) -> None:
    """Set an alias; a first set racing another one is retried.

    MLflow's SQL store sets an alias by reading its row and inserting it when
    absent, so two first sets of one alias at once (two evaluators finishing
    together) make one fail on the table's key. The row exists by then, and
    the retry updates it.
    """
    from mlflow.exceptions import MlflowException

    for attempt in range(1, ALIAS_WRITE_ATTEMPTS + 1):
        try:
            client.set_registered_model_alias(model_name, alias, version)
            return
        except MlflowException as error:
            if attempt == ALIAS_WRITE_ATTEMPTS or not lost_insert_race(error):
                raise


def current_champion(client, model_name: str):
    """The version that holds `champion`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def reconcile(client, model_name: str, registered: int | None = None):
    """Point `champion` at the best eligible version; return it once a read confirms it there.

    `registered` is the version the caller's gate just judged. Every move is
    recorded in the champion's history (history.py), and so is a move by
    hand found here, before the alias moves again.
    """
    from mnist_mlops.tracking import history

    def held() -> str | None:
        holder = current_champion(client, model_name)
        return str(holder.version) if holder is not None else None

    hand = history.find_hand_move(client, model_name, held(), held)
    if hand is not None:
        history.record(client, model_name, hand)
    for _ in range(RECONCILE_ATTEMPTS):
        best = best_eligible(client, model_name)
        if best is None:
            return None
        holder = current_champion(client, model_name)
        if holder is not None and str(holder.version) == str(best.version):
            return best
        set_alias(client, model_name, CHAMPION, best.version)
        history.record(client, model_name, history.moved(holder, best, registered))
    raise RuntimeError(
        f"the alias {CHAMPION} of {model_name} kept moving under {RECONCILE_ATTEMPTS} "
        "reconciliations: is something else setting it?"
    )
