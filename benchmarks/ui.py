"""Benchmark: `make ui` against MLflow's own `mlflow ui`, on the project's store.

For each, in alternating rounds: the seconds from the command to the UI's
first answer (for `mnist-mlops ui`, to its printed links), then its
processes and their summed resident memory once it is up.

    python -m benchmarks.ui [--rounds 3]

Needs the store of a `make repro` (mlflow.db at the project root).
"""

import argparse
import subprocess
import sys
import tempfile
import time

from benchmarks.common import (
    PROJECT,
    alternating,
    answers,
    free_port,
    mnist_mlops,
    project_env,
    ratio_line,
    resident_mib,
    spread,
    stop,
    wait_until,
)

COMMANDS = {
    "mnist-mlops ui": lambda port: mnist_mlops("ui", "--port", str(port)),
    "mlflow ui (defaults)": lambda port: [
        *(sys.executable, "-m", "mlflow", "ui", "--port", str(port)),
        *("--backend-store-uri", f"sqlite:///{PROJECT / 'mlflow.db'}"),
    ],
}
SIZES: dict[str, list[tuple[int, float]]] = {name: [] for name in COMMANDS}


def start(name: str) -> float:
    """Start one UI; its seconds to ready. Records its processes and memory, then stops it."""
    import psutil

    port = free_port()
    with tempfile.TemporaryFile("w+") as log:
        started = time.monotonic()
        process = subprocess.Popen(
            COMMANDS[name](port), cwd=PROJECT, env=project_env(), stdout=log, stderr=log
        )
        if name.startswith("mnist-mlops"):

            def ready() -> bool:
                log.seek(0)
                return "registered model:" in log.read()
        else:

            def ready() -> bool:
                return answers(f"http://127.0.0.1:{port}/health")

        wait_until(ready, process, name)
        seconds = time.monotonic() - started
        time.sleep(5)  # what it keeps once up, not what it passed through
        members = 1 + len(psutil.Process(process.pid).children(recursive=True))
        SIZES[name].append((members, resident_mib(process.pid)))
        stop(process)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    if not (PROJECT / "mlflow.db").exists():
        sys.exit("mlflow.db is missing: run `make repro` first")
    samples = alternating(arguments.rounds, list(COMMANDS), start)
    for name in COMMANDS:
        processes = max(members for members, _mib in SIZES[name])
        mib = [size for _members, size in SIZES[name]]
        print(
            f"{name}: ready in {spread(samples[name])}; {processes} processes, "
            f"{spread(mib, 'MiB')} summed resident"
        )
    print(ratio_line(samples, "mnist-mlops ui", "mlflow ui (defaults)"))


if __name__ == "__main__":
    main()
