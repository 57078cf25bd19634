"""Stage `preprocess`: validate the raw MNIST files, split off a validation set, add feedback.

Reads data/raw (either `mnist.npz` or the four IDX files), checks shapes,
types and labels, holds out a stratified validation set, and writes one
uncompressed `.npz` per split to data/processed, with a manifest that records
the counts and the digest of the arrays (the data version every run logs).
Pixels stay raw uint8 in 0–255: the scaling is part of the model.

With a feedback snapshot (data/feedback, served images with true digits),
the newest `feedback.recent_fraction` of it by serving time becomes the
`recent` split, which evaluate scores and training never sees, and the older
part joins the training split with the sample weight `feedback.weight`.
Without one, the splits and their digest are exactly what they were before
feedback existed.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from mnist_mlops.atomic import atomic_directory
from mnist_mlops.config import Config
from mnist_mlops.model.architectures import NUM_CLASSES
from mnist_mlops.model.digits import DataError, check_split
from mnist_mlops.monitoring.snapshot import SnapshotError, load_snapshot
from mnist_mlops.paths import (
    FEEDBACK_SNAPSHOT_FILE,
    PROCESSED_DATA_DIR,
    PROCESSED_MANIFEST,
    RAW_DATA_DIR,
    processed_split_file,
)
from mnist_mlops.pipeline.raw import NPZ_FILE, read_raw

Split = tuple[np.ndarray, np.ndarray]


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Indices (train, validation), holding out `fraction` of every class, reproducibly.

    The validation set has exactly round(fraction × examples) members; classes
    whose share has the largest remainder take the leftover places.
    """
    class_counts = np.bincount(labels, minlength=NUM_CLASSES)
    exact_shares = class_counts * fraction
    quotas = np.floor(exact_shares).astype(int)
    leftover = round(len(labels) * fraction) - quotas.sum()
    quotas[np.argsort(quotas - exact_shares, kind="stable")[:leftover]] += 1
    if quotas.sum() in (0, len(labels)):
        raise DataError(
            f"a validation fraction of {fraction} leaves an empty split of {len(labels)} examples"
        )
    generator = np.random.default_rng(seed)
    validation = [
        generator.permutation(np.flatnonzero(labels == digit))[:quota]
        for digit, quota in enumerate(quotas)
    ]
    validation_indices = np.sort(np.concatenate(validation))
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[validation_indices] = False
    return np.flatnonzero(train_mask), validation_indices


def digest(splits: dict[str, Split], weights: np.ndarray | None = None) -> str:
    """A content digest of the processed arrays: the data version recorded with every run."""
    hasher = hashlib.sha256()
    for name in sorted(splits):
        for array in splits[name]:
            hasher.update(f"{name}:{array.dtype}:{array.shape};".encode())
            hasher.update(np.ascontiguousarray(array).tobytes())
    if weights is not None:
        hasher.update(f"weights:{weights.dtype}:{weights.shape};".encode())
        hasher.update(np.ascontiguousarray(weights).tobytes())
    return hasher.hexdigest()


def split_feedback(snapshot: dict[str, np.ndarray], recent_fraction: float) -> tuple[Split, Split]:
    """(older, recent): the snapshot's newest round(fraction × rows) rows are the recent split.

    The snapshot is in serving-time order, so the recent split is the traffic
    the next model will meet soonest, and no recent image is older than a
    training one.
    """
    images, labels = snapshot["images"], snapshot["labels"].astype(np.uint8)
    recent = round(len(labels) * recent_fraction)
    boundary = len(labels) - recent
    return (images[:boundary], labels[:boundary]), (images[boundary:], labels[boundary:])


def preprocess(
    config: Config, raw_dir: Path = RAW_DATA_DIR, feedback_file: Path = FEEDBACK_SNAPSHOT_FILE
) -> dict:
    """Validate and split the raw data and the feedback into PROCESSED_DATA_DIR.

    Returns the manifest.
    """
    (train_images, train_labels), (test_images, test_labels) = read_raw(raw_dir)
    check_split("train", train_images, train_labels, config.data.train_examples)
    check_split("test", test_images, test_labels, config.data.test_examples)
    try:
        snapshot = load_snapshot(feedback_file)
    except SnapshotError as error:
        raise DataError(str(error)) from None
    train_indices, validation_indices = stratified_split(
        train_labels, config.train.validation_fraction, config.train.seed
    )
    (older_images, older_labels), recent = split_feedback(snapshot, config.feedback.recent_fraction)
    splits = {
        "train": (
            np.concatenate([train_images[train_indices], older_images]),
            np.concatenate([train_labels[train_indices].astype(np.uint8), older_labels]),
        ),
        "validation": (
            train_images[validation_indices],
            train_labels[validation_indices].astype(np.uint8),
        ),
        "test": (test_images, test_labels.astype(np.uint8)),
    }
    if len(snapshot["labels"]):
        splits["recent"] = recent
    weights = None
    if len(older_labels) and config.feedback.weight != 1:
        weights = np.ones(len(splits["train"][1]), dtype=np.float32)
        weights[len(train_indices) :] = config.feedback.weight
    manifest = {
        "digest": digest(splits, weights),
        "examples": {name: len(labels) for name, (_images, labels) in splits.items()},
        "format": "mnist.npz" if (raw_dir / NPZ_FILE).exists() else "idx",
    }
    if len(snapshot["labels"]):
        manifest["feedback"] = {
            "snapshot_rows": len(snapshot["labels"]),
            "train": len(older_labels),
            "recent": len(recent[1]),
            "weight": config.feedback.weight,
        }
    with atomic_directory(PROCESSED_DATA_DIR) as staging:
        for name, (images, labels) in splits.items():
            arrays = {"images": images, "labels": labels}
            if name == "train" and weights is not None:
                arrays["weights"] = weights
            np.savez(staging / processed_split_file(name).name, **arrays)
        (staging / PROCESSED_MANIFEST.name).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_split(split: str) -> Split:
    """The (images, labels) of one processed split."""
    with np.load(processed_split_file(split), allow_pickle=False) as archive:
        return archive["images"], archive["labels"]


def load_weights(split: str) -> np.ndarray | None:
    """The sample weights of a split, or None when every example counts once."""
    with np.load(processed_split_file(split), allow_pickle=False) as archive:
        return archive["weights"] if "weights" in archive.files else None


def has_split(split: str) -> bool:
    return processed_split_file(split).exists()


def load_manifest() -> dict:
    return json.loads(PROCESSED_MANIFEST.read_text())
