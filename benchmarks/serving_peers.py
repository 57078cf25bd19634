"""Benchmark: the project's model server against its peers, side by side, on the same ONNX file.

Every server answers the champion's ONNX file (one intra-op thread) with
the same numbers, on 127.0.0.1, one at a time, in alternating rounds:

  - serve: `mnist-mlops serve` as `make serve` runs it (a worker per core,
    metrics and the inference log on); the same with `--no-log --no-metrics`,
    with `--no-log` alone and `--no-metrics` alone (what each costs), with
    `--access-log`, and with `--workers 1`;
  - mlflow: `mlflow models serve` (MLflow's own scoring server);
  - litserve, litserve-batch: LitServe 0.2.19, a worker per core, without
    and with its batching (16 requests, 5 ms);
  - bentoml, bentoml-batch: BentoML 1.4.40, a worker per core, without and
    with adaptive batching (up to 16);
  - floor: a bare ASGI app on uvicorn (uvloop, httptools, orjson), a worker
    per core: what answering this model over HTTP costs at least.

For each: the time from its start to its first answer, p50 of sequential
one-image requests, and p50, p99 and requests/s from 8 and from 32 clients
(benchmarks/loadgen.py, on keep-alive connections). The peers install into
their own virtual environment (.venv/peers by default, made on first use),
never into the project's lock.

    python -m benchmarks.serving_peers [--rounds 3] [--only NAME ...] [--peers-env DIR]

Run `make repro` first: it serves the champion of the project's store.
"""

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    CHAMPION,
    PROJECT,
    alternating,
    cpu_seconds,
    free_port,
    mnist_mlops,
    one_image_body,
    post,
    project_env,
    wait_quiet,
    wait_until,
)

PEERS = PROJECT / "benchmarks" / "peers"
PEER_PACKAGES = ("litserve==0.2.19", "bentoml==1.4.40")
# The project's own pins for what the peers share with it: the same runtime and parser.
SHARED_PINS = ("onnxruntime", "numpy", "orjson", "uvloop", "httptools")
# (clients, requests at most, seconds): long enough for periodic work (the log's flush) to count.
LOADS = {"sequential": (1, 1000, 60), "8 clients": (8, 10**6, 6), "32 clients": (32, 10**6, 6)}
CORES = len(os.sched_getaffinity(0))


def peers_python(folder: Path) -> Path:
    """The peers' interpreter, its environment made first if missing."""
    python = folder / "bin" / "python"
    if python.exists():
        return python
    lock = (PROJECT / "requirements-lock.txt").read_text().splitlines()
    pins = [line for line in lock if line.split("==")[0].lower() in SHARED_PINS]
    print(f"installing LitServe and BentoML into {folder} (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    install = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*install, *PEER_PACKAGES, *pins], check=True)
    return python


def store() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{PROJECT / 'mlflow.db'}")


def champion_onnx(folder: Path) -> Path:
    import mlflow

    mlflow.set_tracking_uri(store())
    downloaded = Path(mlflow.artifacts.download_artifacts(CHAMPION, dst_path=str(folder)))
    return next(downloaded.rglob("*.onnx"))


def servers(peers: Path, onnx: Path, scratch: Path) -> dict:
    """name: (command with {port}, environment, working folder, scoring path)."""
    project = project_env(MLFLOW_TRACKING_URI=store())
    peer = {**project_env(PEER_ONNX=str(onnx), PEER_WORKERS=str(CORES)), "PATH": os.environ["PATH"]}
    serve = [*mnist_mlops("serve"), "--port", "{port}", "--log-dir", str(scratch / "log")]
    bentoml = [str(peers.parent / "bentoml"), "serve", "bentoml_app:Digits", "--host", "127.0.0.1"]
    litserve = [str(peers), "litserve_app.py", "{port}", str(CORES)]
    ours = {
        "serve": [],
        "serve --no-log --no-metrics": ["--no-log", "--no-metrics"],
        "serve --no-log": ["--no-log"],
        "serve --no-metrics": ["--no-metrics"],
        "serve --access-log": ["--access-log"],
        "serve --workers 1": ["--workers", "1"],
    }
    mlflow = ["models", "serve", "-m", CHAMPION, "--env-manager", "local", "-h", "127.0.0.1"]
    return {
        **{
            name: ([*serve, *flags], project, PROJECT, "/invocations")
            for name, flags in ours.items()
        },
        "mlflow models serve": (
            [sys.executable, "-m", "mlflow", *mlflow, "-p", "{port}"],
            project,
            PROJECT,
            "/invocations",
        ),
        "litserve": ([*litserve, "1"], peer, PEERS, "/invocations"),
        "litserve, batch 16 / 5 ms": ([*litserve, "16"], peer, PEERS, "/invocations"),
        "bentoml": ([*bentoml, "--port", "{port}"], peer, PEERS, "/invocations"),
        "bentoml, adaptive batching": (
            [*bentoml, "--port", "{port}"],
            {**peer, "PEER_BATCH": "1"},
            PEERS,
            "/invocations",
        ),
        "floor (bare ASGI)": (
            [sys.executable, "floor.py", "{port}", str(CORES)],
            peer,
            PEERS,
            "/invocations",
        ),
    }


def load(port: int, path: str, body_file: Path, clients: int, requests: int, seconds: float):
    command = [sys.executable, "-m", "benchmarks.loadgen", str(port), path, str(body_file)]
    command += [str(clients), str(requests), str(seconds)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT)
    if done.returncode:
        sys.exit(f"the load generator failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def one_round(name: str, spec, body_file: Path, answers: dict) -> list[dict]:
    command, env, cwd, path = spec
    port = free_port()
    started = time.perf_counter()
    process = subprocess.Popen(
        [part.replace("{port}", str(port)) for part in command],
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    body = body_file.read_bytes()
    try:
        wait_until(lambda: post(port, body, timeout=5) == 200, process, name, seconds=300)
        sample = {"start_s": time.perf_counter() - started}
        wait_quiet(process.pid)  # the other workers of a multi-process server load too
        for load_name, (clients, requests, seconds) in LOADS.items():
            cpu = cpu_seconds(process.pid)
            measured = load(port, path, body_file, clients, requests, seconds)
            # The server's own CPU for each request: what bounds its throughput
            # once the cores are full, and steadier than req/s on a shared machine.
            used = cpu_seconds(process.pid) - cpu
            sample[f"{load_name} cpu_ms"] = used / measured["requests"] * 1000
            if measured["failed"]:
                sys.exit(f"{name}: {measured['failed']} requests failed under {load_name}")
            answers[name] = measured["answer"]
            for key in ("p50_ms", "p99_ms", "rps"):
                sample[f"{load_name} {key}"] = measured[key]
    finally:
        stop_group(process)
    return [sample]


def stop_group(process: subprocess.Popen) -> None:
    """Stop a server and every process it started (LitServe's and BentoML's workers)."""
    for signal_number, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal_number)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and group_alive(process.pid):
            process.poll()
            time.sleep(0.1)


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def same_predictions(answers: dict) -> None:
    """Every server's answer holds the same digit and probabilities (to the 6th decimal)."""

    def rows(text: str) -> list:
        parsed = json.loads(text)
        return parsed["predictions"] if isinstance(parsed, dict) else parsed

    first = "serve" if "serve" in answers else next(iter(answers))
    reference = rows(answers[first])
    for name, text in answers.items():
        assert rows(text) == reference, f"{name} answers {text[:200]}, {first} {reference}"


HEADER = (
    "| server | start to first answer | p50, sequential | req/s, 8 clients | req/s, 32 clients "
    "| p99 at 32 clients | CPU a request, 32 clients |\n|---|---:|---:|---:|---:|---:|---:|"
)


def report(samples: dict) -> None:
    measures = ("p50_ms", "p99_ms", "rps", "cpu_ms")
    keys = ["start_s", *(f"{load} {key}" for load in LOADS for key in measures)]
    median = {
        name: {key: statistics.median(sample[key] for sample in runs) for key in keys}
        for name, runs in samples.items()
    }
    print(f"\n{HEADER}")
    for name, value in median.items():
        print(
            f"| {name} | {value['start_s']:.1f} s | {value['sequential p50_ms']:.2f} ms "
            f"| {value['8 clients rps']:,.0f} | {value['32 clients rps']:,.0f} "
            f"| {value['32 clients p99_ms']:.1f} ms | {value['32 clients cpu_ms']:.3f} ms |"
        )
    print()
    for line in targets(median):
        print(line)
    per_round = {name: [round(s["32 clients rps"]) for s in runs] for name, runs in samples.items()}
    print(f"\nreq/s at 32 clients, per round: {per_round}")


def targets(median: dict) -> list[str]:
    """The issue's targets, each as a ratio of medians against its bound."""
    ours, lines = median.get("serve"), []
    if ours is None:
        return lines

    def line(what: str, value: float, target: str) -> None:
        lines.append(f"{what}: {value:.2f} (target {target})")

    floor = median.get("floor (bare ASGI)")
    if floor:
        line(
            "p50 sequential / floor",
            ours["sequential p50_ms"] / floor["sequential p50_ms"],
            "≤ 1.5",
        )
        for load in ("8 clients", "32 clients"):
            line(f"req/s {load} / floor", ours[f"{load} rps"] / floor[f"{load} rps"], "≥ 0.6")
    litserve = [value for name, value in median.items() if name.startswith("litserve")]
    if litserve:
        for load in ("8 clients", "32 clients"):
            best = max(value[f"{load} rps"] for value in litserve)
            line(f"req/s {load} / best LitServe", ours[f"{load} rps"] / best, "≥ 1.5")
        best_p99 = min(value["32 clients p99_ms"] for value in litserve)
        line("p99 at 32 clients / best LitServe's", ours["32 clients p99_ms"] / best_p99, "≤ 1")
    bare = median.get("serve --no-log --no-metrics")
    if bare:
        for load in ("8 clients", "32 clients"):
            line(
                f"req/s {load}, observed / not", ours[f"{load} rps"] / bare[f"{load} rps"], "≥ 0.95"
            )
        cpu = bare["32 clients cpu_ms"] / ours["32 clients cpu_ms"]
        line("requests per CPU-second at 32 clients, observed / not", cpu, "≥ 0.95")
    one = median.get("serve --workers 1")
    if one:
        line("start to first answer / --workers 1", ours["start_s"] / one["start_s"], "≤ 1")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", action="append", default=[], help="a server (repeatable)")
    parser.add_argument("--peers-env", type=Path, default=PROJECT / ".venv" / "peers")
    arguments = parser.parse_args()
    peers = peers_python(arguments.peers_env)
    with tempfile.TemporaryDirectory(prefix="mnist-peers-") as folder:
        scratch = Path(folder)
        onnx = champion_onnx(scratch / "champion")
        body_file = scratch / "body.json"
        body_file.write_bytes(one_image_body())
        table = servers(peers, onnx, scratch)
        names = [name for name in table if not arguments.only or name in arguments.only]
        answers: dict[str, str] = {}
        samples = alternating(
            arguments.rounds, names, lambda name: one_round(name, table[name], body_file, answers)
        )
        same_predictions(answers)
        print(f"{len(answers)} servers, the same answers; {CORES} cores, {arguments.rounds} rounds")
        report(samples)


if __name__ == "__main__":
    main()
