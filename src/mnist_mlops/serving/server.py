"""`mnist-mlops serve`: a registered model behind MLflow's own scoring server, in one process.

`mlflow models serve` resolves the model in one Python process and then starts
uvicorn in a second one, which imports MLflow again and loads the model: two
MLflow imports before the first answer, and two processes' memory. This
command loads the model once and runs MLflow's scoring-server app (the same
endpoints, request formats and error answers) in that same process, so the
ONNX champion answers 2–3 s after start in one process of ~210 MiB.

It imports neither TensorFlow nor the pipeline's config libraries: it runs in
an environment that holds only the served model's requirements.

Around the scoring app (`observed.py`): Prometheus metrics at `/metrics`, a
request id on every answer, the inference log and `POST /feedback`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from mnist_mlops.monitoring.inference_log import LogSettings
from mnist_mlops.paths import MLFLOW_DB_NAME, project_root
from mnist_mlops.serving import webhook
from mnist_mlops.serving.follow import Follower, alias_of
from mnist_mlops.tracking.registry import registered_version
from mnist_mlops.tracking.store import TRACKING_URI_ENV, embedded_store, tracking_uri


class ServeError(Exception):
    """The model cannot be served (not found, or its store cannot be read)."""


@dataclass(frozen=True)
class Observation:
    """What the server records besides answering: metrics, the inference log (None: off), and a
    line per request on stdout (uvicorn's access log: off by default, since /metrics and the
    inference log hold every request, and the line cost a fifth of the throughput)."""

    metrics: bool = True
    log: LogSettings | None = None
    access_log: bool = False


def load_app(
    model_uri: str,
    observation: Observation = Observation(),
    follow_seconds: float = 0,
    siblings: str = "",
    hook_secret: str = "",
):
    """MLflow's scoring-server app around the model at `model_uri`, observed as asked.

    With `follow_seconds` and a `models:/NAME@ALIAS` URI, the app follows the
    alias (follow.py): it checks it that often and swaps a new version in,
    and with `hook_secret` a signed registry webhook makes it look at once
    (webhook.py). `siblings` is the folder where the workers of one server
    announce swaps.
    """
    database = project_root() / MLFLOW_DB_NAME
    from_the_store = model_uri.startswith(("models:/", "runs:/"))
    if from_the_store and embedded_store():
        if not database.exists():
            # Opening it would create an empty store here, which helps nobody.
            raise ServeError(
                f"no MLflow store at {database}: run `make repro` first, or set {TRACKING_URI_ENV}"
            )
        check_writable(database)
    os.environ.setdefault(TRACKING_URI_ENV, tracking_uri())
    # One ONNX Runtime thread per request: with one per core, a single image
    # waited on the pool's hand-off, and concurrent requests fought over the cores.
    os.environ.setdefault("MNIST_ONNX_THREADS", "1")
    from mlflow.exceptions import MlflowException

    try:
        app, model, served = load_version(model_uri)
    except MlflowException as error:
        reason = error.message.strip().splitlines()[0]
        raise ServeError(
            f"cannot load {model_uri} from {os.environ[TRACKING_URI_ENV]}: {reason}"
        ) from None
    followed = alias_of(model_uri) if follow_seconds > 0 else None
    # Observed even with metrics and the log off: the request limits and the
    # stack-free error answers live there.
    from mnist_mlops.serving.observed import observe

    observed = observe(app, model, served, observation.metrics, observation.log, siblings)
    if followed is not None:
        name, alias = followed
        follower = Follower(
            name,
            alias,
            follow_seconds,
            served_version=lambda: observed.current.served.version,
            load=lambda version: load_version(f"models:/{name}/{version}", model_uri),
            swap=lambda loaded: observed.swap(*loaded),
            refused=observed.refused,
            siblings=siblings,
        )
        observed.follower = follower
        follower.start()
        if hook_secret:
            from mnist_mlops.serving.webhook import Hooked

            metrics = observed.metrics
            return Hooked(
                observed,
                hook_secret,
                follower.wake,
                lambda outcome: metrics and metrics.webhooks.labels(outcome=outcome).inc(),
            )
    return observed


def load_version(model_uri: str, served_as: str = ""):
    """(MLflow's scoring app, the loaded pyfunc, what is served) for one model URI.

    An alias is resolved once, so the version served is the version reported.
    `served_as` is the URI the server was started with, when it follows one.
    """
    import mlflow
    from mlflow.pyfunc import scoring_server

    from mnist_mlops.serving.metrics import ServedModel

    name, version, runtime = _registered_version(model_uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}" if version else model_uri)
    served = ServedModel(
        uri=served_as or model_uri,
        name=name,
        version=version,
        run_id=model.metadata.run_id or "",
        runtime=runtime or ("onnx" if "onnxruntime" in sys.modules else "keras"),
    )
    return scoring_server.init(model), model, served


def _registered_version(model_uri: str) -> tuple[str, str, str]:
    """The registered name, version and serving runtime behind a models:/ URI; empty otherwise."""
    version = registered_version(model_uri)
    if version is None:
        return "", "", ""
    return version.name, str(version.version), version.tags.get("serving.runtime", "")


def check_writable(database: Path) -> None:
    """Refuse, in one line, a store that this process can only read.

    Reading the embedded store still writes: SQLite's WAL mode keeps a
    shared-memory file beside the database, and MLflow checks the schema when
    it connects. Without write access MLflow fails deep in SQLAlchemy with
    "attempt to write a readonly database"; in a container that happens when
    the project is mounted read-only or belongs to another uid than the
    container's user.
    """
    for path in (database, database.parent):
        if os.access(path, os.W_OK):
            continue
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            problem = f"{path} is on a read-only mount"
        else:
            problem = f"{path} belongs to uid {path.stat().st_uid}, not to uid {os.getuid()}"
        raise ServeError(
            f"cannot open the MLflow store {database} for writing, which SQLite needs even "
            f"to read it: {problem}. Run as the project's owner (in a container: "
            '--user "$(id -u):$(id -g)") with the project mounted read-write.'
        )


def import_server_modules() -> None:
    """Import what serving a registered ONNX model from a SQLite store imports.

    The serving image runs this once at build time so that exactly these
    modules get their bytecode cached: compiling every installed module would
    add ~80 MB of bytecode that the server never reads, and compiling none
    would cost every container start several seconds.
    """
    import importlib

    for name in (
        "mlflow.pyfunc.scoring_server",
        "mlflow.store.tracking.sqlalchemy_store",
        "mlflow.store.model_registry.sqlalchemy_store",
        "mlflow.store.db.utils",
        "onnxruntime",
        "orjson",
        "pandas",
        "prometheus_client",
        "mnist_mlops.serving.hotpath",
        "uvicorn.main",
        "uvicorn.lifespan.on",
        "uvicorn.loops.uvloop",
        "uvicorn.protocols.http.httptools_impl",
        "uvicorn.protocols.websockets.auto",
    ):
        importlib.import_module(name)


def serve(
    model_uri: str,
    host: str,
    port: int,
    observation: Observation = Observation(),
    follow_seconds: float = 0,
    hook_url: str = "",
) -> int:
    """Serve `model_uri` on host:port in this process until SIGINT or SIGTERM; return the status.

    With `hook_url`, a followed alias on a tracking server is also told by
    webhook (webhook.py). (workers.py runs several processes on one port.)
    """
    import uvicorn

    from mnist_mlops.processes import port_taken

    if taken := port_taken(host, port, "make serve PORT=…, or --port"):
        print(f"mnist-mlops serve: {taken}", file=sys.stderr)
        return 1
    hook = webhook.new_secret() if hook_url and webhook.wanted(model_uri, follow_seconds) else ""
    try:
        app = load_app(model_uri, observation, follow_seconds, hook_secret=hook)
    except ServeError as error:
        print(f"mnist-mlops serve: {error}", file=sys.stderr)
        return 1
    print(f"mnist-mlops serve: {model_uri} on http://{host}:{port}", flush=True)
    if hook:
        try:
            hook_id = webhook.register(*alias_of(model_uri), hook_url, hook)
        except Exception as error:
            webhook.say_polling(webhook.first_line(error))
        else:
            webhook.say_told(hook_url, hook_id)
            app.on_shutdown = lambda: webhook.unregister(hook_id)
    # On SIGINT or SIGTERM uvicorn finishes the requests in flight, shuts
    # down, then ends the process by that same signal.
    # A port it cannot bind ends it with one logged error and exit status 3.
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=observation.access_log)
    # Reached when the server could not start, or stopped without a signal;
    # after SIGINT or SIGTERM the app's shutdown has closed the log already.
    close = getattr(app, "close", None)
    if close:
        close()
    return 0
