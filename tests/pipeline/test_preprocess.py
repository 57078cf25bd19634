"""Stage preprocess: both raw formats, validation errors, the stratified split."""

import dataclasses
import gzip
import json

import numpy as np
import pytest

from mnist_mlops.paths import PROCESSED_DATA_DIR, PROCESSED_MANIFEST, RAW_DATA_DIR
from mnist_mlops.pipeline.fetch import IDX_FILES, NPZ_FILE, fetch
from mnist_mlops.pipeline.preprocess import (
    DataError,
    load_split,
    preprocess,
    stratified_split,
)
from mnist_mlops.pipeline.raw import read_idx, read_npz

from ..conftest import TEST_EXAMPLES, TRAIN_EXAMPLES, idx_bytes, tiny_mnist


def write_raw_npz(**arrays) -> None:
    (train_images, train_labels), (test_images, test_labels) = tiny_mnist()
    values = dict(
        x_train=train_images, y_train=train_labels, x_test=test_images, y_test=test_labels
    )
    values.update(arrays)
    RAW_DATA_DIR.mkdir(parents=True)
    np.savez(RAW_DATA_DIR / NPZ_FILE, **values)


def test_npz_and_idx_give_identical_splits(workdir, config, mirror):
    fetch(config.data)
    npz_manifest = preprocess(config)
    from_npz = {split: load_split(split) for split in ("train", "validation", "test")}

    fetch(dataclasses.replace(config.data, format="idx"))
    assert sorted(path.name for path in RAW_DATA_DIR.iterdir()) == sorted(IDX_FILES.values())
    idx_manifest = preprocess(config)
    assert idx_manifest["digest"] == npz_manifest["digest"]
    for split, (images, labels) in from_npz.items():
        idx_images, idx_labels = load_split(split)
        np.testing.assert_array_equal(images, idx_images)
        np.testing.assert_array_equal(labels, idx_labels)


def test_split_is_stratified_reproducible_and_complete(workdir, config):
    fetch(config.data)
    manifest = preprocess(config)
    train_images, _train_labels = load_split("train")
    _validation_images, validation_labels = load_split("validation")
    test_images, _ = load_split("test")
    assert manifest["examples"] == {
        "train": TRAIN_EXAMPLES - len(validation_labels),
        "validation": len(validation_labels),
        "test": TEST_EXAMPLES,
    }
    # 200 images, 20 per class, 10% held out: 2 of every digit.
    assert np.bincount(validation_labels, minlength=10).tolist() == [2] * 10
    assert train_images.dtype == np.uint8 and train_images.shape[1:] == (28, 28)
    assert int(train_images.max()) == 255, "pixels stay raw: the model does the scaling"
    assert json.loads(PROCESSED_MANIFEST.read_text())["digest"] == manifest["digest"]
    assert len(test_images) == TEST_EXAMPLES

    first = stratified_split(np.arange(100) % 10, 0.2, seed=7)
    again = stratified_split(np.arange(100) % 10, 0.2, seed=7)
    other = stratified_split(np.arange(100) % 10, 0.2, seed=8)
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])
    assert sorted(np.concatenate(first).tolist()) == list(range(100))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"y_train": np.full(TRAIN_EXAMPLES, 10, dtype=np.uint8)},
            r"train labels: 200 outside 0–9",
        ),
        ({"x_test": np.zeros((TEST_EXAMPLES, 28, 27), np.uint8)}, r"test images: expected uint8"),
        ({"x_train": np.zeros((TRAIN_EXAMPLES, 28, 28), np.float32)}, r"got float32"),
        ({"y_test": np.zeros(TEST_EXAMPLES - 1, np.uint8)}, r"test: 50 images but 49 labels"),
        ({"y_train": np.zeros(TRAIN_EXAMPLES, np.float64)}, r"train labels: expected integers"),
    ],
)
def test_invalid_raw_data_is_rejected_with_a_clear_error(workdir, config, arrays, message):
    write_raw_npz(**arrays)
    with pytest.raises(DataError, match=message):
        preprocess(config)
    assert not PROCESSED_DATA_DIR.exists()


def test_expected_counts_are_enforced(workdir, config):
    write_raw_npz()
    strict = dataclasses.replace(
        config, data=dataclasses.replace(config.data, train_examples=60000)
    )
    with pytest.raises(DataError, match="train: expected 60000 examples, got 200"):
        preprocess(strict)


def test_object_arrays_are_refused_not_unpickled(workdir, config):
    write_raw_npz(x_train=np.array([object()] * TRAIN_EXAMPLES, dtype=object))
    with pytest.raises(DataError, match="holds Python objects; refused"):
        read_npz(RAW_DATA_DIR / NPZ_FILE)


def test_corrupt_npz_is_rejected(workdir, tmp_path):
    broken = tmp_path / NPZ_FILE
    broken.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(DataError, match="not a readable npz"):
        read_npz(broken)


def test_idx_header_and_length_are_checked(tmp_path):
    images = np.zeros((3, 28, 28), np.uint8)
    good = tmp_path / "good.gz"
    good.write_bytes(gzip.compress(idx_bytes(images)))
    np.testing.assert_array_equal(read_idx(good, 2051), images)
    with pytest.raises(DataError, match="magic number 2051, expected 2049"):
        read_idx(good, 2049)

    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(gzip.compress(idx_bytes(images)[:-100]))
    with pytest.raises(DataError, match=r"promises shape \(3, 28, 28\)"):
        read_idx(truncated, 2051)

    cut_gzip = tmp_path / "cut.gz"
    cut_gzip.write_bytes(gzip.compress(idx_bytes(images))[:40])
    with pytest.raises(DataError, match="not a readable gzip file"):
        read_idx(cut_gzip, 2051)
