"""Files made by someone else: every command answers a hostile one in one line, exit 2, bounded.

The reproductions of the security review (docs/security.md, rows 10, 11 and
14), run through the real commands in fresh processes, whose peak memory
(`ru_maxrss` of the child) is checked against what the file would have cost.
"""

import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mnist_mlops.monitoring.feedback import read_labels, record
from mnist_mlops.monitoring.log_files import RequestIndex

from .conftest import subprocess_env

# A fresh interpreter with numpy and pyarrow stays well under this.
PEAK_MB = 700


# Runs the command and then records its own peak memory (VmHWM). Not ru_maxrss
# from wait4: on Linux a child's starts at its parent's resident size at the
# fork, here pytest's (2.3 GB by the end of the suite).
MEASURED = """
import os, runpy, sys
sys.argv = ["mnist-mlops", *sys.argv[1:]]
try:
    runpy.run_module("mnist_mlops", run_name="__main__", alter_sys=True)
finally:
    with open("/proc/self/status") as status, open(os.environ["PEAK_FILE"], "w") as peak:
        peak.write(next(line for line in status if line.startswith("VmHWM:")).split()[1])
"""


def command(arguments: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    """Run `mnist-mlops ARGUMENTS`; its result and its own peak resident memory, MiB."""
    peak = cwd / ".peak-kib"
    done = subprocess.run(
        [sys.executable, "-c", MEASURED, *arguments],
        cwd=cwd,
        env=subprocess_env(PEAK_FILE=str(peak)),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return done, int(peak.read_text()) / 1024


def one_line_refusal(done: subprocess.CompletedProcess, *expected: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for text in expected:
        assert text in lines[0], lines[0]


def npz_declaring(path: Path, shape: tuple[int, ...], payload: bytes = b"") -> None:
    """An .npz whose one array `images` declares `shape` of uint8, with only `payload` after."""
    header = {"descr": "|u1", "fortran_order": False, "shape": shape}
    text = repr(header).encode()
    text += b" " * (63 - (10 + len(text)) % 64) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + payload
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("images.npy", npy)


def test_an_npz_declaring_a_billion_images_is_refused_before_allocating(tmp_path):
    npz_declaring(tmp_path / "claims.npz", (10**9, 28, 28))
    done, peak = command(["batch-input", "claims.npz", "out.parquet"], tmp_path)
    one_line_refusal(done, "claims.npz", "over the limit")
    assert peak < PEAK_MB and not (tmp_path / "out.parquet").exists()


class RepeatedDeflate:
    """zlib's raw deflate, for one chunk written again and again: after a full flush the
    deflater starts afresh, so the same chunk deflates to the same bytes each time. It is
    deflated once (a second, against 15 for the bomb's 3 GB of zeros)."""

    def __init__(self) -> None:
        self.deflater = zlib.compressobj(6, zlib.DEFLATED, -15)
        # By the chunk's id, with the chunk kept alive so that no other object takes its id.
        self.deflated: dict[int, tuple[bytes, bytes]] = {}

    def compress(self, data) -> bytes:
        if id(data) not in self.deflated:
            deflated = self.deflater.compress(data) + self.deflater.flush(zlib.Z_FULL_FLUSH)
            self.deflated[id(data)] = (data, deflated)
        return self.deflated[id(data)][1]

    def flush(self) -> bytes:
        return self.deflater.flush()


def npz_of_zeros(path: Path, images: int, chunks: int) -> None:
    """An .npz whose images.npy holds `images` 28×28 zero images, in `chunks` equal writes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        header = {"descr": "|u1", "fortran_order": False, "shape": (images, 28, 28)}
        text = repr(header).encode()
        text += b" " * (63 - (10 + len(text)) % 64) + b"\n"
        with archive.open("images.npy", "w", force_zip64=True) as member:
            member._compressor = RepeatedDeflate()
            member.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text)
            zeros = bytes(images * 28 * 28 // chunks)
            for _ in range(chunks):
                member.write(zeros)


def test_a_deflated_npz_bomb_is_refused_from_its_header(tmp_path):
    # The same writer, small: a real deflate stream that inflates to exactly its zeros.
    npz_of_zeros(tmp_path / "small.npz", 4096, 8)
    with np.load(tmp_path / "small.npz", allow_pickle=False) as small:
        assert small["images"].shape == (4096, 28, 28) and not small["images"].any()
    # 3 MB on disk that inflates to 3 GB of zeros under an honest header.
    path = tmp_path / "bomb.npz"
    npz_of_zeros(path, 4_000_000, 48)
    assert path.stat().st_size < 5_000_000
    done, peak = command(["batch-input", "bomb.npz", "out.parquet"], tmp_path)
    one_line_refusal(done, "bomb.npz", "over the limit")
    assert peak < PEAK_MB


def test_labels_outside_0_to_9_are_refused_not_coerced(tmp_path):
    images = np.zeros((3, 28, 28), np.uint8)
    for labels, shown in ((np.array([1, 300, 2]), "300"), (np.array([1.0, np.nan, 2.0]), "float")):
        np.savez(tmp_path / "digits.npz", images=images, labels=labels)
        done, _peak = command(["batch-input", "digits.npz", "out.parquet"], tmp_path)
        one_line_refusal(done, "labels", shown)
        assert not (tmp_path / "out.parquet").exists()


def png_declaring(path: Path, width: int, height: int) -> None:
    """A PNG whose header says width × height grey pixels, with one compressed row."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(width + 1)))
        + chunk(b"IEND", b"")
    )


def test_a_picture_over_the_pixel_limit_is_refused_before_decoding(tmp_path):
    for width in (15_000, 8_000):  # 225 Mpx (Pillow's own bomb limit) and 64 Mpx (ours)
        png_declaring(tmp_path / "huge.png", width, width)
        done, peak = command(["predict", "huge.png", "--url", "http://127.0.0.1:9"], tmp_path)
        one_line_refusal(done, "huge.png")
        assert peak < PEAK_MB


def test_feedback_with_digits_that_are_not_ascii_is_refused_in_one_line(tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    for digit in ("²", "٣", "10", "-1"):
        (tmp_path / "labels.csv").write_text(f"request_id,position,digit\nabc,0,{digit}\n")
        done, _peak = command(["feedback", "record", "labels.csv", "--log-dir", "log"], tmp_path)
        one_line_refusal(done, "labels.csv:2", "the digit must be in 0–9")
    (tmp_path / "labels.csv").write_text("request_id,position,digit\nabc,²,1\n")
    done, _peak = command(["feedback", "record", "labels.csv", "--log-dir", "log"], tmp_path)
    one_line_refusal(done, "labels.csv:2", "position")


def test_unknown_feedback_ids_are_looked_up_in_one_pass(tmp_path):
    """200,000 unknown ids against a log of 26 files: one read of the folder, not one per id."""
    from mnist_mlops.monitoring.inference_log import save_feedback

    log = tmp_path / "log"
    for part in range(26):
        save_feedback(log, [(f"known-{part}-{row}", 0, 1) for row in range(100)])
        rows = log / f"rows-w{part}-00000001.npz"
        np.savez(rows, request_id=np.array([f"known-{part}"]), position=np.array([0], np.int16))
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "request_id,position,digit\n" + "".join(f"unknown-{row},0,1\n" for row in range(200_000))
    )
    labels = read_labels(csv)
    started = time.perf_counter()
    RequestIndex(log).all_requests()
    one_read = time.perf_counter() - started
    started = time.perf_counter()
    summary = record(log, labels)
    # What it guards: a read per unknown id (88 s here before). One read and
    # 200,000 dict lookups take a second or two; this bound holds many times over.
    assert time.perf_counter() - started < 200 * one_read + 20
    assert (summary.matched, summary.unknown, summary.duplicated) == (0, 200_000, 0)


def test_score_reads_a_parquet_of_huge_cells_within_its_batch_budget(tmp_path):
    """150 cells of 10 MB in a file of a few KB: one dictionary value that every row names."""
    from mnist_mlops.batch.formats import BATCH_BYTES, IMAGE, read_batches, split_valid

    cells = pa.DictionaryArray.from_arrays(
        pa.array(np.zeros(150, np.int32)), pa.array([bytes(10 << 20)], pa.binary())
    )
    table = pa.table({"id": pa.array(range(150)), "image": cells})
    pq.write_table(table, tmp_path / "in.parquet", compression="zstd")
    del cells, table
    assert (tmp_path / "in.parquet").stat().st_size < 100_000
    rejected, held = 0, []
    for batch in read_batches(tmp_path / "in.parquet", 8192):
        valid, pixels, refused = split_valid(batch.column("id"), batch.column(IMAGE))
        held.append(pa.total_allocated_bytes())
        assert len(valid) == len(pixels) == 0
        rejected += len(refused)
    assert rejected == 150
    # Decoded whole, the rows would have been 1.5 GB.
    assert max(held) < BATCH_BYTES
    # Plain-encoded cells are read a few rows at a time, by the sizes they declare.
    plain = pa.table({"id": pa.array(range(20)), "image": pa.array([bytes(10 << 20)] * 20)})
    pq.write_table(plain, tmp_path / "plain.parquet", use_dictionary=False, compression="zstd")
    del plain
    sizes = [batch.nbytes for batch in read_batches(tmp_path / "plain.parquet", 8192)]
    assert sum(sizes) > 200 << 20 and max(sizes) <= BATCH_BYTES
