"""The server follows an alias: a new champion is loaded, checked and swapped in without a restart.

Every `interval` seconds a thread asks the registry which version the alias
names (at once when a registry webhook calls, webhook.py). On a change it
loads that version beside the one being served, has it classify the known
digits its evaluation logged (one correctly classified test image per digit,
inside the classifier; `serving/known_digits.npz` in the run of a version
from before that), and only if it
answers every one correctly swaps it in: one assignment, so a request in
flight finishes on the version it started with and the next one gets the
new. A version that fails to load or to answer is refused with one line and
counted in `/metrics`; the old one keeps serving, and the refused version is
not tried again (a new version is).
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

KNOWN_DIGITS_ARTIFACT = "serving/known_digits.npz"
# The workers of one server (workers.py) announce a new version in a file that
# the others look at this often, so that they all load it at once.
HINT_SECONDS = 0.1
ANNOUNCED_FILE = "announced-version"


def known_digits(images: np.ndarray, labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Indices of the first correctly classified image of each digit (digits never right: none).

    evaluate logs those images inside the classifier (model/flavors.py), so a
    server reads them with the model; older versions have them in their run.
    """
    right = np.flatnonzero(labels == predicted)
    _digits, first = np.unique(labels[right], return_index=True)
    return right[first]


class VersionRefused(Exception):
    """A new version that must not be served."""


def check_answers(model, run_id: str) -> str:
    """Raise VersionRefused unless `model` classifies its run's known digits correctly.

    Returns what was checked. A version registered before known digits were
    logged is checked on a blank image: it must answer with ten probabilities.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from mnist_mlops.model.classifier import python_model_of

    inside = getattr(python_model_of(model), "known_digits", None)
    with tempfile.TemporaryDirectory() as directory:
        try:
            path = inside or mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=KNOWN_DIGITS_ARTIFACT, dst_path=directory
            )
            with np.load(path, allow_pickle=False) as archive:
                images, labels = archive["images"], archive["labels"]
        except (MlflowException, OSError, KeyError, ValueError):
            images, labels = np.zeros((1, 28, 28), np.uint8), None
    try:
        answers = model.predict(images.astype(np.float32))
        digits = [answer["digit"] for answer in answers]
        sums = [sum(answer["probabilities"]) for answer in answers]
    except Exception as error:
        raise VersionRefused(f"it cannot classify an image ({_first_line(error)})") from None
    if len(digits) != len(images) or not all(abs(total - 1) < 1e-3 for total in sums):
        raise VersionRefused("its answers are not ten probabilities per image")
    if labels is None:
        return "a blank image (no known digits logged with it)"
    wrong = [int(label) for label, digit in zip(labels, digits, strict=True) if digit != label]
    if wrong:
        raise VersionRefused(f"it misclassifies the known digit(s) {wrong}")
    return f"{len(labels)} known digits"


class Follower:
    """A thread that keeps the served version equal to what `models:/NAME@ALIAS` names."""

    def __init__(
        self,
        name: str,
        alias: str,
        interval: float,
        served_version: Callable[[], str],
        load: Callable[[str], tuple],
        swap: Callable[[tuple], None],
        refused: Callable[[], None],
        siblings: str = "",
    ) -> None:
        self.name, self.alias, self.interval = name, alias, interval
        # The folder where the workers of one server announce what they swapped to.
        self.siblings = siblings
        self.served_version, self.load, self.swap, self.refused = (
            served_version,
            load,
            swap,
            refused,
        )
        self._refused: set[str] = set()
        self._unreachable = False
        self._stop = threading.Event()
        # Set by a webhook call (webhook.py): look now, not at the next period.
        self._woken = threading.Event()
        self._thread = threading.Thread(target=self._run, name="follow-alias", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._woken.set()

    def wake(self) -> None:
        """Look at the alias now (from any thread; the looking is done by the follower's)."""
        self._woken.set()

    def _run(self) -> None:
        due = time.monotonic() + self.interval
        step = min(self.interval, HINT_SECONDS) if self.siblings else self.interval
        while True:
            woken = self._woken.wait(min(step, max(due - time.monotonic(), 0.0)))
            self._woken.clear()
            if self._stop.is_set():
                return
            hint = announced(self.siblings) if self.siblings else ""
            news = hint and hint != self.served_version() and hint not in self._refused
            if woken or news or time.monotonic() >= due:
                self.check()
                due = time.monotonic() + self.interval

    def check(self) -> str:
        """Look once; return what happened: same, swapped, refused, skipped or unreachable."""
        from mlflow import MlflowClient

        try:
            wanted = MlflowClient().get_model_version_by_alias(self.name, self.alias)
        except Exception as error:
            if not self._unreachable:
                _say(f"cannot read {self.name}@{self.alias}; still serving: {_first_line(error)}")
            self._unreachable = True
            return "unreachable"
        self._unreachable = False
        version = str(wanted.version)
        current = self.served_version()
        if version == current:
            return "same"
        if version in self._refused:
            return "skipped"
        # The other workers load it at the same time, not one after the other.
        if self.siblings:
            announce(self.siblings, version)
        started = time.monotonic()
        try:
            loaded = self.load(version)
            checked = check_answers(loaded[1], wanted.run_id)
        except Exception as error:
            self._refused.add(version)
            self.refused()
            _say(f"refused {self.name} v{version}, still serving v{current}: {_first_line(error)}")
            return "refused"
        self.swap(loaded)
        took = time.monotonic() - started
        _say(
            f"now serving {self.name} v{version} (was v{current}; checked on {checked}; "
            f"loaded in {took:.1f} s)"
        )
        return "swapped"


def announce(folder: str, version: str) -> None:
    """Tell the other workers that `version` is served now (atomically: they read it any time)."""
    path = Path(folder) / ANNOUNCED_FILE
    temporary = path.with_suffix(f".{os.getpid()}")
    temporary.write_text(version)
    temporary.replace(path)


def announced(folder: str) -> str:
    try:
        return (Path(folder) / ANNOUNCED_FILE).read_text()
    except OSError:
        return ""


def _first_line(error: Exception) -> str:
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    return str(text).strip().splitlines()[0]


def _say(line: str) -> None:
    print(f"mnist-mlops serve: {line}", file=sys.stderr, flush=True)


def alias_of(model_uri: str) -> tuple[str, str] | None:
    """(name, alias) of `models:/NAME@ALIAS`; None for any other URI."""
    if not model_uri.startswith("models:/") or "@" not in model_uri:
        return None
    name, alias = model_uri.removeprefix("models:/").split("@", 1)
    return (name, alias) if name and alias and "/" not in alias else None
