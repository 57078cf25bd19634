"""Merging a writer's parts into a segment in a folder: the same rows as numpy's own join."""

import time
import zipfile

import numpy as np
import pytest

from mnist_mlops.monitoring.inference_log import InferenceLog, LogSettings, merge_parts
from mnist_mlops.monitoring.log_files import concatenate, load, log_files, read_rows
from mnist_mlops.monitoring.segments import merge_folder_parts


def part(tmp_path, name: str, rows: int, version: str, client: str, pixels: bool = True):
    """A rows part as the writer saves it: `rows` images, one model version, one client id."""
    generator = np.random.default_rng(rows)
    arrays = {
        "request_id": np.array([f"{name}-{row}" for row in range(rows)]),
        "client_request_id": np.array([client] * rows, dtype=str),
        "position": np.zeros(rows, np.int16),
        "time": generator.random(rows),
        "probabilities": generator.random((rows, 10)).astype(np.float32),
        "model_name": np.array("mnist"),
        "model_version": np.array(version),
        "digit": generator.integers(0, 10, rows).astype(np.int8),
    }
    if pixels:
        arrays["pixels"] = generator.integers(0, 256, (rows, 28, 28)).astype(np.uint8)
    else:
        arrays["features"] = generator.random((rows, 4)).astype(np.float32)
    path = tmp_path / f"{name}.npz"
    np.savez(path, **arrays)
    return path, arrays


def test_a_merged_segment_holds_the_rows_numpy_would_join_in_order(tmp_path):
    # Text of different widths and a version swapped between parts: joined by numpy;
    # the pixels and the rest: copied. Either way, the same arrays as numpy's join.
    parts = [
        part(tmp_path, "a", 3, "1", ""),
        part(tmp_path, "b", 5, "2", "a-much-longer-client-id"),
        part(tmp_path, "c", 1, "2", "x"),
    ]
    target = tmp_path / "segment.npz"
    merge_folder_parts([path for path, _ in parts], target)
    merged = load(target)
    expected = concatenate([arrays for _, arrays in parts])
    assert set(merged) == set(expected)
    for name, values in expected.items():
        assert merged[name].dtype == values.dtype, name
        np.testing.assert_array_equal(merged[name], values, err_msg=name)
    assert merged["model_version"].tolist() == ["1"] * 3 + ["2"] * 6
    assert oct(target.stat().st_mode & 0o777) == "0o600"


def test_parts_with_and_without_pixels_merge_into_what_both_have(tmp_path):
    parts = [part(tmp_path, "a", 2, "1", ""), part(tmp_path, "b", 2, "1", "", pixels=False)]
    target = tmp_path / "segment.npz"
    merge_folder_parts([path for path, _ in parts], target)
    assert "pixels" not in load(target) and "features" not in load(target)
    assert load(target)["request_id"].tolist() == ["a-0", "a-1", "b-0", "b-1"]


def test_a_damaged_part_fails_the_merge_and_leaves_no_segment(tmp_path):
    (first, _), (second, _) = part(tmp_path, "a", 4, "1", ""), part(tmp_path, "b", 4, "1", "")
    data = bytearray(second.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte in the pixels: the zip's checksum fails
    second.write_bytes(bytes(data))
    target = tmp_path / "segment.npz"
    with pytest.raises(zipfile.BadZipFile):
        merge_folder_parts([first, second], target)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.npz", "b.npz"]


def test_the_writer_merges_its_parts_and_every_row_reads_back_once(tmp_path):
    settings = LogSettings(tmp_path, flush_seconds=0.02, segment_bytes=10**9)
    log = InferenceLog(settings, "mnist", "1")
    generator = np.random.default_rng(0)
    sent = {}
    for number in range(6):
        images = generator.integers(0, 256, (number % 3 + 1, 28, 28)).astype(np.float32)
        answers = [{"digit": 1, "probabilities": [0.1] * 10} for _ in images]
        assert log.submit_rows(f"r{number}", images, answers, "1", f"client-{number}" * number)
        sent[f"r{number}"] = images
        time.sleep(0.05)  # a part per request or two
    log.close()
    assert len(log_files(tmp_path, "rows")) > 1
    merge_parts(tmp_path, log.writer, "rows", segment_bytes=1, seconds=3600)
    assert len(log_files(tmp_path, "rows")) == 1
    rows = read_rows(tmp_path)
    assert len(rows["request_id"]) == sum(len(images) for images in sent.values())
    for request_id, images in sent.items():
        mine = rows["request_id"] == request_id
        np.testing.assert_array_equal(rows["pixels"][mine], images.astype(np.uint8))
        assert rows["position"][mine].tolist() == list(range(len(images)))
    assert rows["probabilities"] == pytest.approx(np.full((len(rows["digit"]), 10), 0.1))


def test_a_damaged_part_is_left_alone_and_the_writer_goes_on(tmp_path, capfd):
    settings = LogSettings(tmp_path, flush_seconds=0.02, segment_bytes=1)
    log = InferenceLog(settings, "mnist", "1")
    images = np.zeros((1, 28, 28), np.float32)
    answers = [{"digit": 0, "probabilities": [0.1] * 10}]
    log.submit_rows("r0", images, answers)
    time.sleep(0.2)
    (damaged,) = tmp_path.glob("rows-*.npz")
    damaged.write_bytes(damaged.read_bytes()[:-40])  # its zip directory cut short
    log.submit_rows("r1", images, answers)
    time.sleep(0.2)
    log._tidy()  # what the writer does every ten flushes
    log.submit_rows("r2", images, answers)
    log.close()
    assert "cannot tidy the inference log" in capfd.readouterr().err
    assert damaged.exists()
    assert {file.name for file in log_files(tmp_path, "rows")} >= {damaged.name}
    # r2 was written after the tidying failed: three parts, none merged.
    assert len(list(tmp_path.glob("rows-*.npz"))) == 3
