"""One process of a data-parallel fit on Keras's JAX backend (`train.distributed.processes` > 1).

Every process runs `fit_process`: the `train` stage's process 0 (started by
`pipeline/distributed.py`) and each `mnist-mlops train-worker` on another
machine. They join JAX's coordinator, build the same network from the same
seed, and each epoch walk the same global batches: one permutation of the
training set, drawn from (train.seed, epoch) whatever the number of
processes, cut into batches of `train.batch_size`, of which process i feeds
the i-th equal share. Keras's `DataParallel` then averages the gradients of
the whole global batch on every process, so every process holds the same
weights after every step, and those of one process fed the same batches
(to float rounding; the tests check 1e-6).

Validation: every process feeds the whole validation split, so the global
validation batch holds each image N times and the mean loss and accuracy are
exactly those of the split. It costs one forward pass per process, a few per
cent of an epoch.

Only process 0 writes anything, and only into the private folder the stage
gives it (`result`): the per-epoch metrics as they come, then the weights.
Every process ends by printing the digest of its weights: equal digests
prove that the machines finished in step.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from mnist_mlops.atomic import atomic_path
from mnist_mlops.config import Config
from mnist_mlops.model.architectures import (
    INFERENCE_BATCH_SIZE,
    build_model,
    import_keras,
    set_random_seed,
)
from mnist_mlops.pipeline.preprocess import load_manifest, load_split, load_weights

EPOCHS_FILE = "epochs.jsonl"
WEIGHTS_FILE = "weights.npz"


def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which an epoch visits the training images, whatever the number of processes."""
    return np.random.default_rng([seed, epoch]).permutation(count)


def share(order: np.ndarray, batch_size: int, process_id: int, processes: int) -> np.ndarray:
    """Process `process_id`'s rows of every global batch of `order`, batch after batch.

    Each global batch of `batch_size` rows gives each process `batch_size /
    processes` consecutive rows. The last, shorter batch is split the same way;
    the at most processes − 1 rows that do not divide evenly sit out that epoch
    (another permutation next epoch), so every process runs the same number of
    equal steps, which the collectives need.
    """
    per_process = batch_size // processes
    whole = len(order) // batch_size * batch_size
    blocks = order[:whole].reshape(-1, batch_size)
    mine = blocks[:, process_id * per_process : (process_id + 1) * per_process].reshape(-1)
    rest = order[whole:]
    rest_share = len(rest) // processes
    return np.concatenate([mine, rest[process_id * rest_share : (process_id + 1) * rest_share]])


def weights_digest(weights: list[np.ndarray]) -> str:
    """sha256 of the weights' bytes in order: equal on every process that finished in step."""
    digest = hashlib.sha256()
    for array in weights:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def join(process_id: int, processes: int, coordinator: str, timeout_seconds: int) -> None:
    """Join the fit's processes through JAX's coordinator, which process 0 runs at `coordinator`.

    JAX's own default would bind the coordinator to every interface; the
    bind address here keeps it where the config says. `timeout_seconds`
    bounds the wait for every process to join and how long a process that
    stopped sending heartbeats is waited for.
    """
    import jax

    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=processes,
        process_id=process_id,
        coordinator_bind_address=coordinator if process_id == 0 else None,
        initialization_timeout=timeout_seconds,
        heartbeat_timeout_seconds=timeout_seconds,
        shutdown_timeout_seconds=timeout_seconds,
    )


class MismatchError(Exception):
    """The processes of a fit do not train on the same data and settings."""


def fingerprint(config: Config) -> str:
    """sha256 of what every process must share: the data's digest and the training settings.

    Everything that decides the updates (model, optimizer, train without its
    `distributed` part, feedback weighting) and data/processed's digest.
    """
    shared = {
        "data": load_manifest()["digest"],
        "model": config.raw["model"],
        "optimizer": config.raw["optimizer"],
        "train": {k: v for k, v in config.raw["train"].items() if k != "distributed"},
        "feedback": config.raw.get("feedback"),
    }
    return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()


def agree(process_id: int, mine: str) -> None:
    """Compare every process's fingerprint (one all-gather); MismatchError names who differs."""
    from jax.experimental import multihost_utils

    local = np.frombuffer(bytes.fromhex(mine), dtype=np.uint32)
    everyone = np.asarray(multihost_utils.process_allgather(local))
    differing = [index for index, row in enumerate(everyone) if (row != everyone[0]).any()]
    if differing:
        names = ", ".join(f"process {index}" for index in differing)
        raise MismatchError(
            f"{names} would train on other data or settings than process 0 (data/processed "
            "or params.yaml differ): run every process on the same commit after `dvc pull`"
        )


def use_jax() -> None:
    """Before Keras is imported: the JAX backend on CPU."""
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def fit_process(
    config: Config,
    process_id: int,
    processes: int,
    coordinator: str,
    result: Path | None = None,
    steps: int | None = None,
) -> str:
    """Train this process's share of every global batch; return the digest of the final weights.

    `steps` stops after that many global batches (the tests compare 1 and 2
    processes on the same batches); None runs `train.epochs` epochs.
    """
    use_jax()
    keras = import_keras()
    if processes > 1:
        import jax

        join(process_id, processes, coordinator, config.train.distributed.timeout_seconds)
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=jax.devices(), auto_shard_dataset=False)
        )
        agree(process_id, fingerprint(config))
    set_random_seed(config.train.seed)
    network = build_model(config.model, config.optimizer)
    images, labels = load_split("train")
    weights = load_weights("train")
    validation = load_split("validation")
    per_process = config.train.batch_size // processes
    epochs = config.train.epochs if steps is None else 1
    for epoch in range(epochs):
        rows = share(
            epoch_order(len(images), config.train.seed, epoch),
            config.train.batch_size,
            process_id,
            processes,
        )
        if steps is not None:
            rows = rows[: steps * per_process]
        started = time.perf_counter()
        history = network.fit(
            images[rows],
            labels[rows],
            sample_weight=None if weights is None else weights[rows],
            validation_data=None if steps is not None else validation,
            validation_batch_size=INFERENCE_BATCH_SIZE,
            batch_size=per_process,
            epochs=epoch + 1,
            initial_epoch=epoch,
            shuffle=False,
            verbose=0,
        )
        metrics = {name: float(values[-1]) for name, values in history.history.items()}
        seconds = time.perf_counter() - started
        shown = "  ".join(f"{name} {value:.4f}" for name, value in metrics.items())
        where = f"process {process_id}/{processes} epoch {epoch + 1}/{epochs}"
        print(f"{where}: {shown}  ({seconds:.1f} s)", flush=True)
        if result is not None:
            with open(result / EPOCHS_FILE, "a") as lines:
                lines.write(json.dumps({"epoch": epoch, "seconds": seconds, **metrics}) + "\n")
    final = [np.asarray(array) for array in network.get_weights()]
    digest = weights_digest(final)
    if result is not None:
        # The optimizer's state too, so that the saved model is the one a single process saves.
        state = {f"weight_{index}": array for index, array in enumerate(final)}
        for index, variable in enumerate(network.optimizer.variables):
            state[f"optimizer_{index}"] = np.asarray(variable.value)
        with atomic_path(result / WEIGHTS_FILE) as path, open(path, "wb") as file:
            np.savez(file, **state)
    print(f"process {process_id}/{processes} done: weights sha256 {digest}", flush=True)
    return digest


def main(argv: list[str] | None = None) -> int:
    """`python -m mnist_mlops.pipeline.worker`: one process, started by pipeline/distributed.py."""
    import argparse

    from mnist_mlops.config import load_params
    from mnist_mlops.pipeline.preprocess import DataError
    from mnist_mlops.processes import collect_less

    collect_less()
    parser = argparse.ArgumentParser(prog="mnist-mlops train-worker")
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--result", type=Path)
    parser.add_argument("--steps", type=int, help="stop after this many global batches")
    arguments = parser.parse_args(argv)
    try:
        fit_process(
            load_params(arguments.params),
            arguments.process_id,
            arguments.processes,
            arguments.coordinator,
            arguments.result,
            arguments.steps,
        )
    except MismatchError as error:
        print(f"mnist-mlops train-worker: {error}", file=sys.stderr, flush=True)
        return 1
    except (DataError, FileNotFoundError) as error:
        print(f"mnist-mlops train-worker: error: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
