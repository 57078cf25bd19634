"""Benchmark: the images' sizes, and how fast the serving image starts and stops.

Runs the serving image on a project's champion (default: this project, after
`make repro`) as the project's owner, the README's way, `--repeat` times:
from `podman run` to the first answer of `/ping`, then `podman stop` and how
the container ended. The images must be built first (the README's Docker
section; on machines without Docker, `eval "$(.ci/containers)"` prepares
buildah and podman).

    python -m benchmarks.containers [--project DIR] [--repeat 5]
"""

import argparse
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from benchmarks.common import PROJECT, free_port

SERVE_IMAGE, PIPELINE_IMAGE = "mnist-mlops-serve", "mnist-mlops"


def podman(*arguments: str) -> str:
    return subprocess.run(
        ["podman", *arguments], check=True, capture_output=True, text=True, timeout=120
    ).stdout.strip()


def start_and_stop(project: Path) -> tuple[float, float, str]:
    """Seconds from `podman run` to the first /ping, seconds `podman stop` took, exit code."""
    owner = project.stat()
    port, name = free_port(), f"mnist-benchmark-{time.monotonic_ns()}"
    started = time.perf_counter()
    podman(
        *("run", "--detach", "--name", name, "--network", "host"),
        *("--user", f"{owner.st_uid}:{owner.st_gid}", "-e", f"MNIST_SERVE_PORT={port}"),
        *("-v", f"{project}:{project}", "-w", str(project), SERVE_IMAGE),
    )
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError):
                if time.perf_counter() - started > 120:
                    raise SystemExit(f"no answer in 120 s:\n{podman('logs', name)}") from None
                time.sleep(0.02)
        first_answer = time.perf_counter() - started
        stopping = time.perf_counter()
        podman("stop", "--time", "10", name)
        stopped = time.perf_counter() - stopping
        return first_answer, stopped, podman("inspect", name, "--format", "{{.State.ExitCode}}")
    finally:
        subprocess.run(["podman", "rm", "--force", name], capture_output=True, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=PROJECT, help="(%(default)s)")
    parser.add_argument("--repeat", type=int, default=5, help="(%(default)s)")
    arguments = parser.parse_args()
    for image in (SERVE_IMAGE, PIPELINE_IMAGE):
        size = int(podman("image", "inspect", image, "--format", "{{.Size}}"))
        print(f"{image}: {size / 1e6:.0f} MB")
    runs = [start_and_stop(arguments.project.resolve()) for _ in range(arguments.repeat)]
    starts, stops = [run[0] for run in runs], [run[1] for run in runs]
    print(
        f"podman run to first /ping: median {statistics.median(starts):.2f} s "
        f"(min {min(starts):.2f}, max {max(starts):.2f}; target ≤ 5 s)"
    )
    print(
        f"podman stop: median {statistics.median(stops):.2f} s (max {max(stops):.2f}; "
        f"target ≤ 2 s); exit codes {sorted({run[2] for run in runs})} (143 = SIGTERM)"
    )


if __name__ == "__main__":
    main()
