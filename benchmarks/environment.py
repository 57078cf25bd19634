"""Benchmark: the size of the served model's environment against the whole project's.

Builds, in a temporary folder (or --keep DIR), a fresh virtual environment
from requirements-serve.txt as the Dockerfile's `serve` target installs it
(`pip install --no-deps`, `pip check`, then the project itself; the image then
drops test suites and unused bytecode, which this does not), checks that it cannot import
TensorFlow, and compares its installed size with the project's .venv (made
by `make install` from requirements-lock.txt).

    python -m benchmarks.environment [--keep DIR]

With --keep, the environment stays for `python -m benchmarks.serving --serve-env DIR`.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import PROJECT


def size_bytes(directory: Path) -> int:
    """Bytes of every regular file under `directory`, each hard link once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            status = os.lstat(os.path.join(root, name))
            if (status.st_dev, status.st_ino) not in seen:
                seen.add((status.st_dev, status.st_ino))
                total += status.st_size
    return total


def build(environment: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(environment)], check=True)
    pip = [
        str(environment / "bin" / "python"),
        "-m",
        "pip",
        "--quiet",
        "--disable-pip-version-check",
    ]
    requirements = PROJECT / "requirements-serve.txt"
    subprocess.run([*pip, "install", "--no-deps", "-r", str(requirements)], check=True)
    # Complete by itself: every requirement of every package is pinned in the file.
    subprocess.run([*pip, "check"], check=True)
    # The project itself, for `mnist-mlops serve`; its pipeline dependencies stay out.
    subprocess.run([*pip, "install", "--no-deps", str(PROJECT)], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="build the environment here and keep it")
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        environment = (arguments.keep or Path(scratch) / "serve-env").resolve()
        seconds = build(environment)
        probe = subprocess.run(
            [str(environment / "bin" / "python"), "-c", "import tensorflow"],
            capture_output=True,
        )
        if probe.returncode == 0:
            sys.exit("the serving environment can import tensorflow")
        served = size_bytes(environment)
    full = size_bytes(PROJECT / ".venv")
    print(
        f"serving environment (requirements-serve.txt): {served / 2**20:7.0f} MiB, built in "
        f"{seconds:.0f} s"
    )
    print(f"project environment (.venv, lock file):       {full / 2**20:7.0f} MiB")
    print(f"ratio: {served / full:.1%} (target <= 15%)")


if __name__ == "__main__":
    main()
