"""The inference log's files, written by the real writer thread into a temporary folder."""

import collections
import gc
import os
import shutil
import time

import numpy as np
import pytest

from mnist_mlops.monitoring.features import FEATURES, image_features
from mnist_mlops.monitoring.inference_log import (
    InferenceLog,
    LogSettings,
    merge_parts,
    save_feedback,
)
from mnist_mlops.monitoring.log_files import (
    all_log_files,
    load,
    log_files,
    mark_written,
    read_feedback,
    read_rows,
    remove_expired,
    written_past,
)
from mnist_mlops.monitoring.log_store import FolderStore


def answers_for(images: np.ndarray) -> list[dict]:
    """Answers shaped like the classifier's: a digit and ten probabilities per image."""
    rows = []
    for index in range(len(images)):
        probabilities = np.full(10, 0.01)
        probabilities[index % 10] = 0.91
        rows.append({"digit": index % 10, "probabilities": probabilities.tolist()})
    return rows


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 28, 28)).astype(np.float32)


def test_a_bar_has_the_features_a_person_would_measure():
    bar = np.zeros((1, 28, 28), dtype=np.uint8)
    bar[0, 4:24, 10:13] = 255  # 20 rows tall, 3 columns wide
    features = dict(zip(FEATURES, image_features(bar)[0].tolist(), strict=True))
    assert features["ink_fraction"] == pytest.approx(60 / 784)
    assert features["mean_intensity"] == pytest.approx(60 / 784)
    assert (features["width"], features["height"]) == (3, 20)
    assert features["centroid_x"] == pytest.approx(11) and features["centroid_y"] == pytest.approx(
        13.5
    )
    assert 2.5 < features["stroke_thickness"] < 3.5
    blank = image_features(np.zeros((1, 28, 28)))[0]
    assert blank.tolist() == [0, 0, 13.5, 13.5, 0, 0, 0]


def test_rows_are_written_once_merged_and_read_back_exactly(tmp_path):
    settings = LogSettings(tmp_path, flush_seconds=0.05, segment_bytes=1, segment_seconds=3600)
    written = []
    log = InferenceLog(settings, "mnist-classifier", "3", on_written=written.append)
    sent = {f"request-{number}": images(number % 3 + 1, seed=number) for number in range(12)}
    for request_id, batch in sent.items():
        assert log.submit_rows(request_id, batch, answers_for(batch))
        time.sleep(0.08)
    log.close()
    rows = read_rows(tmp_path)
    assert sum(written) == len(rows["request_id"]) == sum(len(batch) for batch in sent.values())
    for request_id, batch in sent.items():
        mine = rows["request_id"] == request_id
        assert rows["position"][mine].tolist() == list(range(len(batch)))
        assert np.array_equal(rows["pixels"][mine], batch.astype(np.uint8))
        assert np.allclose(rows["features"][mine], image_features(batch.astype(np.uint8)))
        assert rows["digit"][mine].tolist() == [index % 10 for index in range(len(batch))]
    assert set(rows["model_version"].tolist()) == {"3"}
    # With the pixels kept, the server leaves the features to the reader.
    assert all("features" not in load(path) for path in log_files(tmp_path, "rows"))
    # Housekeeping merged the parts into a segment (segment_bytes=1 asks for it).
    assert any("-" in path.stem.split("-", 2)[2] for path in log_files(tmp_path, "rows"))


def test_each_flush_writes_its_own_rounded_pixels_though_the_writer_reuses_its_arrays(tmp_path):
    log = InferenceLog(LogSettings(tmp_path, flush_seconds=3600), "mnist-classifier", "3")
    rng = np.random.default_rng(7)
    flushes = [
        {f"big-{n}": rng.uniform(-3, 258, (1, 28, 28)).astype(np.float32) for n in range(40)},
        {"small": np.full((1, 28, 28), 254.5, np.float32)},
        {
            f"mixed-{n}": rng.uniform(0, 255, (n % 3 + 1, 28, 28)).astype(np.float32)
            for n in range(5)
        },
    ]
    for flush in flushes:
        batch = [(request_id, images) for request_id, images in flush.items()]
        for request_id, images in batch:
            assert log.submit_rows(request_id, images, answers_for(images))
        log._write([log._pending.popleft() for _ in range(len(batch))])
    log.close()
    rows = read_rows(tmp_path)
    for flush in flushes:
        for request_id, images in flush.items():
            mine = rows["request_id"] == request_id
            expected = np.clip(np.rint(images), 0, 255).astype(np.uint8)
            assert np.array_equal(rows["pixels"][mine], expected)
            assert rows["position"][mine].tolist() == list(range(len(images)))
    assert rows["pixels"][rows["request_id"] == "small"].max() == 254  # halves round to even


def test_queued_rows_give_the_garbage_collector_nothing_to_track(tmp_path):
    """A second of a busy server's rows waits in the queue as arrays, numbers and strings.

    The answers' dicts and lists, kept until the writer ran, aged through the
    collector's generations and set off full collections of the whole server.
    """
    log = InferenceLog(LogSettings(tmp_path, flush_seconds=3600), "m", "1")
    batches = [images(1, seed=number) for number in range(2000)]
    gc.collect()
    tracked = len(gc.get_objects())
    for number, batch in enumerate(batches):
        assert log.submit_rows(f"r{number}", batch, answers_for(batch), "1", f"c{number}")
    gc.collect()
    assert len(gc.get_objects()) - tracked < 100
    log.close()
    rows = read_rows(tmp_path)
    assert len(rows["request_id"]) == 2000
    assert rows["probabilities"].shape == (2000, 10) and set(rows["digit"].tolist()) == {0}
    assert rows["probabilities"][:, 0] == pytest.approx(0.91)


def three_requests_in_parts(folder) -> InferenceLog:
    """A closed log of requests r0, r1 and r2 (two images each), flushed into separate parts."""
    settings = LogSettings(folder, flush_seconds=0.05, segment_bytes=10**9)
    log = InferenceLog(settings, "m", "1")
    for number in range(3):
        batch = images(2, seed=number)
        log.submit_rows(f"r{number}", batch, answers_for(batch))
        time.sleep(0.15)
    log.close()
    return log


def test_a_segment_stands_for_the_parts_it_covers_after_a_crash(tmp_path):
    log = three_requests_in_parts(tmp_path)
    parts = log_files(tmp_path, "rows")
    assert len(parts) >= 2
    kept = tmp_path / "kept"
    kept.mkdir()
    for part in parts:
        shutil.copy(part.path, kept / part.name)
    # Merge as housekeeping does, then put the parts back, as a writer killed
    # between writing the segment and removing its parts would leave them.
    merge_parts(tmp_path, log.writer, "rows", segment_bytes=1, seconds=3600)
    assert len(log_files(tmp_path, "rows")) == 1
    for part in kept.iterdir():
        shutil.copy(part, tmp_path / part.name)
    rows = read_rows(tmp_path)
    assert sorted(rows["request_id"].tolist()) == ["r0", "r0", "r1", "r1", "r2", "r2"]
    # The same writer's next merge, with a new part beside the old ones (as when a
    # shared spool ships a part again after its merge): the covered parts go, and
    # none of their rows is merged a second time.
    last = sorted(kept.iterdir())[-1]
    newer = last.name.rsplit("-", 1)[0] + f"-{len(parts) + 1:08d}.npz"
    shutil.copy(last, tmp_path / newer)
    shutil.rmtree(kept)
    merge_parts(tmp_path, log.writer, "rows", segment_bytes=1, seconds=3600)
    assert {file.name for file, _ in all_log_files(tmp_path)} == {
        file.name for file in log_files(tmp_path, "rows")
    }
    counts = collections.Counter(read_rows(tmp_path)["request_id"].tolist())
    assert counts == {"r0": 2, "r1": 2, "r2": 4}


class ShippedMeanwhile(FolderStore):
    """A log another process ships a part into right after each listing, as servers
    sharing a spool do (their shippers run beside the merging one)."""

    def __init__(self, root, arriving: list[tuple[str, bytes]]) -> None:
        super().__init__(root)
        self.arriving = arriving

    def files(self):
        listed = super().files()
        if self.arriving:
            self.write(*self.arriving.pop(0))
        return listed


def test_a_part_shipped_while_its_writer_merges_is_kept(tmp_path):
    log = three_requests_in_parts(tmp_path)
    parts = sorted(file.name for file in log_files(tmp_path, "rows"))
    assert len(parts) >= 2
    # The last part arrives only once the merge has listed the log.
    last = tmp_path / parts[-1]
    arriving = [(last.name, last.read_bytes())]
    last.unlink()
    merge_parts(ShippedMeanwhile(tmp_path, arriving), log.writer, "rows", 1, 3600)
    assert last.exists(), "a part no segment covers was removed"
    counts = collections.Counter(read_rows(tmp_path)["request_id"].tolist())
    assert counts == {"r0": 2, "r1": 2, "r2": 2}


def test_feedback_keeps_the_first_digit_of_each_image(tmp_path):
    save_feedback(tmp_path, [("a", 0, 3), ("a", 1, 7)])
    time.sleep(0.01)
    save_feedback(tmp_path, [("a", 0, 5), ("b", 0, 1)])
    assert read_feedback(tmp_path) == {("a", 0): 3, ("a", 1): 7, ("b", 0): 1}


def test_sampling_pixels_off_and_retention(tmp_path):
    settings = LogSettings(tmp_path, sample_rate=0.0, flush_seconds=0.05)
    log = InferenceLog(settings, "m", "1")
    assert not log.submit_rows("never", images(1), answers_for(images(1)))
    log.close()
    assert read_rows(tmp_path) == {}

    log = InferenceLog(LogSettings(tmp_path, pixels=False, flush_seconds=0.05), "m", "1")
    log.submit_rows("kept", images(2), answers_for(images(2)))
    log.close()
    rows = read_rows(tmp_path)
    assert "pixels" not in rows and rows["features"].shape == (2, len(FEATURES))
    assert np.allclose(rows["features"], image_features(images(2).astype(np.uint8)))
    # Files with and without pixels in one folder: every row has its features.
    log = InferenceLog(LogSettings(tmp_path, flush_seconds=0.05), "m", "1")
    log.submit_rows("with-pixels", images(3, seed=4), answers_for(images(3, seed=4)))
    log.close()
    rows = read_rows(tmp_path)
    mine = rows["request_id"] == "with-pixels"
    assert "pixels" not in rows and rows["features"].shape == (5, len(FEATURES))
    assert np.allclose(rows["features"][mine], image_features(images(3, seed=4).astype(np.uint8)))
    for file, _match in all_log_files(tmp_path):
        file.path.unlink()
    log = InferenceLog(LogSettings(tmp_path, pixels=False, flush_seconds=0.05), "m", "1")
    log.submit_rows("kept", images(2), answers_for(images(2)))
    log.close()

    old = time.time() - 3 * 3600
    for file, _match in all_log_files(tmp_path):
        os.utime(file.path, (old, old))
    assert remove_expired(tmp_path, retention_hours=2) == 1
    assert read_rows(tmp_path) == {}


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="sample rate"):
        LogSettings(".", sample_rate=1.5)
    with pytest.raises(ValueError, match="retention_hours"):
        LogSettings(".", retention_hours=0)


def test_feedback_saved_twice_at_once_keeps_both(tmp_path):
    # Each call is a writer of its own; two in one millisecond once shared a file name.
    for number in range(20):
        save_feedback(tmp_path, [(f"request-{number}", 0, number % 10)])
    truth = read_feedback(tmp_path)
    assert len(truth) == 20 and truth[("request-7", 0)] == 7


def test_a_writer_marks_how_far_it_has_written_and_silent_writers_are_not_waited_for(tmp_path):
    settings = LogSettings(tmp_path, flush_seconds=0.05)
    log = InferenceLog(settings, "mnist-classifier", "3")
    asked = time.time()
    assert log.submit_rows("request-1", images(2), answers_for(images(2)))
    deadline = time.monotonic() + 60
    while not written_past(tmp_path, asked, silent_seconds=60):
        assert time.monotonic() < deadline, "the writer marked nothing past the request in 60 s"
        time.sleep(0.05)
    # Past its mark, what the writer held is in the log.
    assert read_rows(tmp_path)["request_id"].tolist() == ["request-1", "request-1"]
    log.close()
    (mark,) = tmp_path.glob("written-*")
    assert mark.stat().st_mode & 0o777 == 0o600 and float(mark.read_text()) >= asked

    later = time.time() + 1
    assert not written_past(tmp_path, later, silent_seconds=60)  # it has not written that far
    os.utime(mark, (later - 61, later - 61))
    assert written_past(tmp_path, later, silent_seconds=60) is False  # silent, but no other mark
    mark_written(tmp_path, "other", later + 0.5)
    assert written_past(tmp_path, later, silent_seconds=60)  # the silent writer is not waited for
    (tmp_path / "written-broken").write_text("not a time")
    assert not written_past(tmp_path, later, silent_seconds=60)
    # Marks go with the retention, as the log's files do.
    os.utime(tmp_path / "written-broken", (0, 0))
    assert remove_expired(tmp_path, retention_hours=1) == 1
    assert {path.name for path in tmp_path.glob("written-*")} == {mark.name, "written-other"}


def test_a_writer_is_known_by_its_mark_before_its_first_request(tmp_path):
    """Another process's feedback must wait for a writer that has not flushed yet."""
    mark_written(tmp_path, "flushing", time.time() + 3600)  # a writer far ahead
    settings = LogSettings(tmp_path, flush_seconds=3600)  # this one never flushes here
    before = time.time()
    log = InferenceLog(settings, "mnist-classifier", "3")
    assert log.submit_rows("request-1", images(1), answers_for(images(1)))
    asked = time.time()
    (mark,) = [path for path in tmp_path.glob("written-*") if path.name != "written-flushing"]
    assert before <= float(mark.read_text()) <= asked
    assert not written_past(tmp_path, asked, silent_seconds=7200)  # the new writer holds rows
    log.close()
    assert written_past(tmp_path, asked, silent_seconds=7200)
    assert read_rows(tmp_path)["request_id"].tolist() == ["request-1"]
