"""Benchmark: the served champion against MLflow's floor and the stock Keras flavor, in one run.

Starts, one after another, on 127.0.0.1:
  - floor: a constant-output pyfunc with the champion's signature behind
    MLflow's scoring server (`mnist-mlops serve`): what any model served this
    way costs at least;
  - champion: `models:/mnist-classifier@champion` under `mnist-mlops serve`
    (MLflow's scoring server in one process; ONNX Runtime by default);
  - champion, `mlflow models serve`: the same model under MLflow's own
    command (two processes), for its start time and memory;
  - stock Keras flavor: the Keras model that the champion's training run
    logged (`runs:/<run>/model`, which calls `model.predict` per request).
For each it measures the time from starting the command to its first answer
to a one-image request, the memory of its processes (RSS, all of them), then
single-image latency from one client in sequence and from a few at once.

    python -m benchmarks.serving [--requests N] [--clients C] [--serve-env DIR]
    python -m benchmarks.serving --proxy    # only: the champion direct and behind nginx

--proxy compares the champion served directly with the same server behind
`mnist-mlops proxy` (nginx, HTTPS), side by side (benchmarks/proxy_cost.py).

--serve-env serves the champion from another environment, such as the one
`python -m benchmarks.environment --keep DIR` builds from requirements-serve.txt.
It uses the project's tracking store (MLFLOW_TRACKING_URI, else mlflow.db at
the project root), so run `make repro` first.
"""

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.common import (
    CHAMPION,
    PROJECT,
    alternating,
    client,
    measure,
    one_image_body,
    project_env,
    resident_mib,
    start_server,
    stop,
)
from benchmarks.proxy_cost import compare

CONSTANT_MODEL = """
import mlflow
from mlflow.pyfunc import PythonModel

ANSWER = [{"digit": 0, "probabilities": [1.0] + [0.0] * 9}]


class Constant(PythonModel):
    def predict(self, context, model_input, params=None):
        return ANSWER * len(model_input)


mlflow.models.set_model(Constant())
"""
ROUNDS = 40


def floor_model(directory: Path) -> str:
    """Save the constant-output pyfunc, with the champion's signature, as models from code."""
    import mlflow

    from mnist_mlops.model.flavors import classifier_signature

    code = directory / "constant.py"
    code.write_text(CONSTANT_MODEL)
    path = directory / "floor"
    mlflow.pyfunc.save_model(path, python_model=str(code), signature=classifier_signature())
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--starts", type=int, default=3, help="times each server is started")
    parser.add_argument("--serve-env", type=Path, help="serve the champion from this venv")
    parser.add_argument("--proxy", action="store_true", help="only the proxy's cost")
    arguments = parser.parse_args()

    env = project_env()
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{PROJECT / 'mlflow.db'}")
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    from mlflow import MlflowClient

    version = MlflowClient().get_model_version_by_alias("mnist-classifier", "champion")
    stock = f"runs:/{version.tags['run_id']}/model"
    runtime = version.tags.get("serving.runtime", "keras")

    body = one_image_body()

    ours = [str(Path(sys.executable).parent / "mnist-mlops"), "serve"]
    if arguments.serve_env:
        ours = [str(arguments.serve_env.resolve() / "bin" / "mnist-mlops"), "serve"]
    mlflow_serve = [*("mlflow", "models", "serve", "--env-manager", "local", "-h", "127.0.0.1")]
    if arguments.proxy:
        compare([*ours, "--model-uri", CHAMPION], env, body, arguments.requests, arguments.clients)
        return

    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        servers = {
            "floor (constant pyfunc)": [*ours, "--model-uri", floor_model(Path(scratch))],
            f"champion ({runtime})": [*ours, "--model-uri", CHAMPION],
            "champion, mlflow serve": [*mlflow_serve, "-m", CHAMPION],
            "stock Keras flavor": [*mlflow_serve, "-m", stock],
        }
        # Starting is timed `--starts` times per server (the median counts);
        # latency is measured on the last start.
        for name, command in servers.items():
            start_times = []
            for attempt in range(arguments.starts):
                process, port, start_seconds = start_server(command, env, body)
                start_times.append(start_seconds)
                if attempt < arguments.starts - 1:
                    stop(process)
            # The stock flavor answers ~20 requests a second: a quarter of the count will do.
            requests = arguments.requests // (4 if name == "stock Keras flavor" else 1)
            try:
                row = {"start_s": statistics.median(start_times)}
                row["sequential"] = measure(port, body, requests, 1)
                row["concurrent"] = measure(port, body, requests, arguments.clients)
                row["memory_mib"] = resident_mib(process.pid)
                results[name] = row
            finally:
                stop(process)

        # The floor and the champion once more, side by side: many short rounds
        # of sequential requests in turn (alternating), so that neither server
        # keeps the machine's better or worse moments.
        commands = {
            "floor": servers["floor (constant pyfunc)"],
            "champion": servers[f"champion ({runtime})"],
        }
        started = {name: start_server(command, env, body) for name, command in commands.items()}
        try:
            ports = {name: port for name, (_process, port, _seconds) in started.items()}
            for port in ports.values():
                client(port, body, 50, [])

            def round_of(name: str) -> list[float]:
                latencies: list[float] = []
                client(ports[name], body, arguments.requests // ROUNDS, latencies)
                return latencies

            paired = alternating(ROUNDS, list(ports), round_of)
        finally:
            for process, _port, _seconds in started.values():
                stop(process)

    print(
        f"champion v{version.version} ({runtime}); {arguments.requests} single-image requests "
        f"per row; concurrent = {arguments.clients} clients"
    )
    print(
        f"{'server':26} {'start s':>8} {'memory MiB':>11} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'req/s':>7} {'conc. p50':>10} {'conc. req/s':>12}"
    )
    for name, row in results.items():
        sequential, concurrent = row["sequential"], row["concurrent"]
        print(
            f"{name:26} {row['start_s']:8.2f} {row['memory_mib']:11.0f} "
            f"{sequential['p50_ms']:7.2f} {sequential['p99_ms']:7.2f} {sequential['rps']:7.1f} "
            f"{concurrent['p50_ms']:10.2f} {concurrent['rps']:12.1f}"
        )
    champion = results[f"champion ({runtime})"]
    keras_flavor = results["stock Keras flavor"]
    floor_p50 = statistics.median(paired["floor"]) * 1000
    champion_p50 = statistics.median(paired["champion"]) * 1000
    print(
        f"side by side, {len(paired['floor'])} requests each: floor p50 {floor_p50:.2f} ms, "
        f"champion p50 {champion_p50:.2f} ms: {champion_p50 / floor_p50:.2f}x the floor "
        "(target <= 1.25)"
    )
    print(
        f"champion vs stock Keras flavor, sequential throughput: "
        f"{champion['sequential']['rps'] / keras_flavor['sequential']['rps']:.1f}x (target >= 20x)"
    )
    print(
        f"champion start to first answer: {champion['start_s']:.2f} s (target <= 2.5 s); "
        f"memory {champion['memory_mib']:.0f} MiB (target <= 250 MB)"
    )


if __name__ == "__main__":
    main()
