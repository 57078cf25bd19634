"""Stage `preprocess`: validate the raw MNIST files and split off a validation set.

Reads data/raw (either `mnist.npz` or the four IDX files), checks shapes,
types and labels, holds out a stratified validation set, and writes one
uncompressed `.npz` per split to data/processed, with a manifest that records
the counts and the digest of the arrays (the data version every run logs).
Pixels stay raw uint8 in 0–255: the scaling is part of the model.
"""

import gzip
import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np

from mnist_mlops.atomic import atomic_directory
from mnist_mlops.config import Config
from mnist_mlops.model.architectures import IMAGE_SHAPE, NUM_CLASSES
from mnist_mlops.paths import (
    PROCESSED_DATA_DIR,
    PROCESSED_MANIFEST,
    RAW_DATA_DIR,
    processed_split_file,
)
from mnist_mlops.pipeline.fetch import IDX_FILES, NPZ_FILE

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049

Split = tuple[np.ndarray, np.ndarray]


class DataError(ValueError):
    """Raw data that is not valid MNIST."""


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read one gzip-compressed IDX file of unsigned bytes (images or labels)."""
    try:
        with gzip.open(path, "rb") as stream:
            content = stream.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: not a readable gzip file ({error})") from None
    if len(content) < 8:
        raise DataError(f"{path}: too short for an IDX header ({len(content)} bytes)")
    magic = int.from_bytes(content[:4], "big")
    if magic != expected_magic:
        raise DataError(f"{path}: IDX magic number {magic}, expected {expected_magic}")
    dimensions = magic & 0xFF
    header_size = 4 + 4 * dimensions
    shape = tuple(
        int.from_bytes(content[4 + 4 * index : 8 + 4 * index], "big") for index in range(dimensions)
    )
    expected_size = header_size + int(np.prod(shape))
    if len(content) != expected_size:
        raise DataError(
            f"{path}: header promises shape {shape} ({expected_size} bytes), "
            f"file has {len(content)} bytes"
        )
    return np.frombuffer(content, dtype=np.uint8, offset=header_size).reshape(shape)


def read_npz(path: Path) -> tuple[Split, Split]:
    """Read the Keras-layout `mnist.npz` without unpickling anything."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(archive.files)
            if missing:
                raise DataError(f"{path}: missing arrays {', '.join(sorted(missing))}")
            return (
                (archive["x_train"], archive["y_train"]),
                (archive["x_test"], archive["y_test"]),
            )
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"{path}: not a readable npz archive ({error})") from None


def read_raw(raw_dir: Path = RAW_DATA_DIR) -> tuple[Split, Split]:
    """The (train, test) images and labels from whichever format fetch stored."""
    if (raw_dir / NPZ_FILE).exists():
        return read_npz(raw_dir / NPZ_FILE)
    missing = [name for name in IDX_FILES.values() if not (raw_dir / name).exists()]
    if missing:
        raise DataError(f"{raw_dir}: neither {NPZ_FILE} nor the IDX files ({', '.join(missing)})")

    def idx(key: str, magic: int) -> np.ndarray:
        return read_idx(raw_dir / IDX_FILES[key], magic)

    return (
        (idx("train_images", IDX_IMAGES_MAGIC), idx("train_labels", IDX_LABELS_MAGIC)),
        (idx("test_images", IDX_IMAGES_MAGIC), idx("test_labels", IDX_LABELS_MAGIC)),
    )


def check_split(name: str, images: np.ndarray, labels: np.ndarray, expected: int | None) -> None:
    """Raise DataError unless this is a well-formed MNIST split."""
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(
            f"{name} images: expected uint8 of shape (N, 28, 28), "
            f"got {images.dtype} of shape {images.shape}"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{name} labels: expected integers of shape (N,), "
            f"got {labels.dtype} of shape {labels.shape}"
        )
    if len(images) != len(labels):
        raise DataError(f"{name}: {len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        bad = labels[(labels < 0) | (labels >= NUM_CLASSES)]
        raise DataError(
            f"{name} labels: {len(bad)} outside 0–{NUM_CLASSES - 1} (e.g. {int(bad[0])})"
        )
    if expected is not None and len(labels) != expected:
        raise DataError(f"{name}: expected {expected} examples, got {len(labels)}")


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


def digest(splits: dict[str, Split]) -> str:
    """A content digest of the processed arrays: the data version recorded with every run."""
    hasher = hashlib.sha256()
    for name in sorted(splits):
        for array in splits[name]:
            hasher.update(f"{name}:{array.dtype}:{array.shape};".encode())
            hasher.update(np.ascontiguousarray(array).tobytes())
    return hasher.hexdigest()


def preprocess(config: Config, raw_dir: Path = RAW_DATA_DIR) -> dict:
    """Validate and split the raw data into PROCESSED_DATA_DIR; return the manifest."""
    (train_images, train_labels), (test_images, test_labels) = read_raw(raw_dir)
    check_split("train", train_images, train_labels, config.data.train_examples)
    check_split("test", test_images, test_labels, config.data.test_examples)
    train_indices, validation_indices = stratified_split(
        train_labels, config.train.validation_fraction, config.train.seed
    )
    splits = {
        "train": (train_images[train_indices], train_labels[train_indices].astype(np.uint8)),
        "validation": (
            train_images[validation_indices],
            train_labels[validation_indices].astype(np.uint8),
        ),
        "test": (test_images, test_labels.astype(np.uint8)),
    }
    manifest = {
        "digest": digest(splits),
        "examples": {name: len(labels) for name, (_images, labels) in splits.items()},
        "format": "mnist.npz" if (raw_dir / NPZ_FILE).exists() else "idx",
    }
    with atomic_directory(PROCESSED_DATA_DIR) as staging:
        for name, (images, labels) in splits.items():
            np.savez(staging / processed_split_file(name).name, images=images, labels=labels)
        (staging / PROCESSED_MANIFEST.name).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_split(split: str) -> Split:
    """The (images, labels) of one processed split."""
    with np.load(processed_split_file(split), allow_pickle=False) as archive:
        return archive["images"], archive["labels"]


def load_manifest() -> dict:
    return json.loads(PROCESSED_MANIFEST.read_text())
