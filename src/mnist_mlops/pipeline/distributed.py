"""The `train` stage's side of a data-parallel fit: start process 0 (and local workers), follow it.

With `train.distributed.processes` = N > 1, `train` runs process 0's fit
(pipeline/worker.py, on Keras's JAX backend) in a child process and
supervises it, while the stage itself keeps the MLflow run, the TensorFlow
model and the outputs exactly as for one process:

- each epoch's metrics, which process 0 appends to a private folder, go to
  the run as they come;
- at the end the stage loads process 0's weights into the same network
  built on TensorFlow, which is saved, exported to ONNX and checked as usual.

Why a child: when a process of a JAX fit disappears, the others learn it from
a failed collective or a missed heartbeat, and JAX then aborts them. In a
child that costs nothing: the stage names the missing process in one line,
ends the run FAILED and writes no output. Every bound is
`train.distributed.timeout_seconds`; the children are stopped with the stage
(Ctrl-C, SIGTERM, or the stage killed outright: PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from mnist_mlops.config import Config, ConfigError, validate
from mnist_mlops.pipeline.worker import EPOCHS_FILE, WEIGHTS_FILE, weights_digest
from mnist_mlops.processes import stop_all, stop_with_parent

# What JAX and gloo say when a process of the fit goes missing.
_MISSING = (
    re.compile(r"Task (\d+) heartbeat timeout"),
    re.compile(r"stopped sending heartbeats\):\s*(\d+)"),
)
_NOT_JOINED = re.compile(r"DEADLINE_EXCEEDED[\s\S]*RegisterTask|RegisterTask[\s\S]*DEADLINE")
_COORDINATOR_GONE = re.compile(
    r"PollForError[\s\S]{0,500}(Socket closed|UNAVAILABLE|Connection refused|reset by peer)"
)
_PEER_GONE = re.compile(r"Gloo[^\n]*(reset by peer|closed by peer)")
_OWN_ERROR = re.compile(r"^mnist-mlops train-worker: (.*)$", re.MULTILINE)


class DistributedError(Exception):
    """A data-parallel fit that could not finish: a process missing, failed or never joined."""


@dataclass(frozen=True)
class Fitted:
    weights: list[np.ndarray]
    optimizer: list[np.ndarray]
    history: dict[str, list[float]]
    digest: str


def with_processes(
    config: Config,
    processes: int | None = None,
    coordinator: str | None = None,
    worker: int | None = None,
) -> Config:
    """The config with train.distributed's processes and coordinator replaced (None keeps one).

    With `worker`, also checks that it is one of the other processes (1 … N−1).
    Raises ConfigError as for any config value.
    """
    distributed = config.train.distributed
    raw = copy.deepcopy(dict(config.raw))
    raw["train"]["distributed"] = {
        **raw["train"].get("distributed", {}),
        "processes": processes or distributed.processes,
        "coordinator": coordinator or distributed.coordinator,
    }
    changed = validate(raw)
    count = changed.train.distributed.processes
    if worker is not None and count < 2:
        raise ConfigError("a worker needs 2 or more processes (--processes)")
    if worker is not None and not 1 <= worker < count:
        raise ConfigError(
            f"--process-id must be 1 … {count - 1} (0 is the train stage), got {worker}"
        )
    return changed


def with_local_processes(config: Config, processes: int) -> Config:
    """The config for `mnist-mlops train --local-processes N`: N processes on this machine.

    The coordinator keeps the config's port on 127.0.0.1; the run's params say
    what really ran.
    """
    port = config.train.distributed.coordinator.rsplit(":", 1)[1]
    return with_processes(config, processes, f"127.0.0.1:{port}")


def process_command(
    params: Path, process_id: int, processes: int, coordinator: str, result: Path | None = None
) -> list[str]:
    """The child that runs one process of the fit (pipeline/worker.py)."""
    command = [
        sys.executable,
        "-m",
        "mnist_mlops.pipeline.worker",
        "--params",
        str(params),
        "--process-id",
        str(process_id),
        "--processes",
        str(processes),
        "--coordinator",
        coordinator,
    ]
    return command if result is None else [*command, "--result", str(result)]


def explain(process_id: int, returncode: int, log: str, config: Config) -> str:
    """One line for a process of the fit that ended with `returncode` and wrote `log`."""
    distributed = config.train.distributed
    abandoned = "; the fit is abandoned"
    for pattern in _MISSING:
        found = pattern.search(log)
        if found and int(found.group(1)) != process_id:
            return (
                f"process {found.group(1)} is gone (it died, was stopped or lost the network; "
                f"silence is waited for {distributed.timeout_seconds} s){abandoned}"
            )
    if _NOT_JOINED.search(log):
        if process_id:
            return f"process {process_id} found no coordinator at {distributed.coordinator}"
        count = distributed.processes
        expected = "process 1" if count == 2 else f"processes 1–{count - 1}"
        return (
            f"not every process joined within {distributed.timeout_seconds} s: {expected} must "
            f"run `mnist-mlops train-worker --coordinator {distributed.coordinator} "
            f"--process-id I --processes {count}`"
        )
    if process_id and _COORDINATOR_GONE.search(log):
        return (
            f"process 0, the coordinator at {distributed.coordinator}, is gone (the train stage "
            f"ended, failed or lost the network){abandoned}"
        )
    own = _OWN_ERROR.findall(log)
    if own:
        return own[-1] if own[-1].startswith("process ") else f"process {process_id}: {own[-1]}"
    if _PEER_GONE.search(log):
        return f"process {process_id} lost a peer mid-fit (connection closed){abandoned}"
    if returncode < 0:
        return f"process {process_id} was stopped by signal {-returncode}"
    lines = [line for line in log.splitlines() if line.strip()]
    last = lines[-1] if lines else "no output"
    return f"process {process_id} failed (exit status {returncode}): {last}"


def fit(
    config: Config, local_workers: bool, on_epoch: Callable[[int, dict[str, float]], None]
) -> Fitted:
    """The stage's process 0 (and, with `local_workers`, every other process here), to the end.

    `on_epoch(epoch, metrics)` gets each epoch's metrics of the global batch
    as process 0 reports them. Raises DistributedError with one line when any
    process fails; every process started here is stopped by then.
    """
    processes = config.train.distributed.processes
    ids = range(processes) if local_workers else range(1)
    with _children(config, ids) as (folder, children):
        _follow(config, children, folder, on_epoch)
        result = folder / "process-0"
        with np.load(result / WEIGHTS_FILE, allow_pickle=False) as saved:
            weights = _numbered(saved, "weight_")
            optimizer = _numbered(saved, "optimizer_")
        lines = (result / EPOCHS_FILE).read_text().splitlines()
    history: dict[str, list[float]] = {}
    for line in lines:
        for name, value in json.loads(line).items():
            if name not in ("epoch", "seconds"):
                history.setdefault(name, []).append(value)
    return Fitted(weights, optimizer, history, weights_digest(weights))


def _numbered(saved, prefix: str) -> list[np.ndarray]:
    count = sum(name.startswith(prefix) for name in saved.files)
    return [saved[f"{prefix}{index}"] for index in range(count)]


def run_worker(config: Config, process_id: int) -> None:
    """`mnist-mlops train-worker`: process `process_id` in a child, to the end or one line."""
    with _children(config, [process_id]) as (folder, children):
        _follow(config, children, folder)


@contextmanager
def _children(config: Config, ids) -> Iterator[tuple[Path, dict[int, subprocess.Popen]]]:
    """Start the processes `ids` of the fit in a private folder; stop them all on the way out.

    Each child's stderr goes to its log there (read only to explain a
    failure); process 0 gets its own result folder; any other process's
    standard output passes through only when it is the only child.
    """
    distributed = config.train.distributed
    if importlib.util.find_spec("jax") is None:
        raise DistributedError(
            "data-parallel training runs on JAX, which is not installed: make install-jax "
            "(or pip install -r requirements-jax.txt)"
        )
    with tempfile.TemporaryDirectory(prefix="mnist-mlops-train-") as private:
        folder = Path(private)
        params = folder / "params.yaml"
        params.write_text(yaml.safe_dump(dict(config.raw), sort_keys=False))
        children: dict[int, subprocess.Popen] = {}
        try:
            for process_id in ids:
                result = None
                if process_id == 0:
                    result = folder / "process-0"
                    result.mkdir()
                log_file = folder / f"process-{process_id}.log"
                shown = process_id == 0 or len(ids) == 1
                with open(log_file, "wb") as log:
                    children[process_id] = subprocess.Popen(
                        process_command(
                            params,
                            process_id,
                            distributed.processes,
                            distributed.coordinator,
                            result,
                        ),
                        stdout=None if shown else log,
                        stderr=log,
                        stdin=subprocess.DEVNULL,
                        preexec_fn=stop_with_parent,
                    )
            yield folder, children
        finally:
            stop_all(list(children.values()), timeout=5)


def _follow(
    config: Config,
    children: dict[int, subprocess.Popen],
    folder: Path,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> None:
    """Pass on each epoch as it lands; return when the first child has finished.

    Raises DistributedError when any child fails.
    """
    first = next(iter(children))
    epochs_file = folder / "process-0" / EPOCHS_FILE
    reported = 0
    while True:
        finished = children[first].poll() is not None
        if on_epoch is not None and epochs_file.exists():
            text = epochs_file.read_text()
            # Process 0 may be writing a line right now: only whole lines count.
            complete = text[: text.rfind("\n") + 1].splitlines()
            for line in complete[reported:]:
                record = json.loads(line)
                on_epoch(record.pop("epoch"), {k: v for k, v in record.items() if k != "seconds"})
            reported = max(reported, len(complete))
        failed = [i for i, child in children.items() if child.poll() not in (None, 0)]
        if failed:
            # A worker that failed first is the cause; process 0 failing after it is the effect.
            culprit = min(failed, key=lambda i: (i == 0, i))
            log = (folder / f"process-{culprit}.log").read_text(errors="replace")
            raise DistributedError(explain(culprit, children[culprit].returncode, log, config))
        if finished:
            others = [child for i, child in children.items() if i != first]
            deadline = time.monotonic() + config.train.distributed.timeout_seconds
            while any(child.poll() is None for child in others) and time.monotonic() < deadline:
                time.sleep(0.1)
            return
        time.sleep(0.2)
