"""`mnist-mlops serve`: a registered model behind MLflow's own scoring server, in one process.

`mlflow models serve` resolves the model in one Python process and then starts
uvicorn in a second one, which imports MLflow again and loads the model: two
MLflow imports before the first answer, and two processes' memory. This
command loads the model once and runs MLflow's scoring-server app (the same
endpoints, request formats and error answers) in that same process, so the
ONNX champion answers 2–3 s after start in one process of ~210 MiB.

It imports neither TensorFlow nor the pipeline's config libraries: it runs in
an environment that holds only the served model's requirements.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mnist_mlops.paths import MLFLOW_DB_NAME, project_root
from mnist_mlops.tracking.store import TRACKING_URI_ENV, embedded_store, tracking_uri


class ServeError(Exception):
    """The model cannot be served (not found, or its store cannot be read)."""


def load_app(model_uri: str):
    """MLflow's scoring-server app around the model at `model_uri`."""
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
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as error:
        reason = error.message.strip().splitlines()[0]
        raise ServeError(
            f"cannot load {model_uri} from {os.environ[TRACKING_URI_ENV]}: {reason}"
        ) from None
    return scoring_server.init(model)


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
        "pandas",
        "uvicorn.main",
        "uvicorn.lifespan.on",
        "uvicorn.loops.asyncio",
        "uvicorn.protocols.http.h11_impl",
        "uvicorn.protocols.websockets.auto",
    ):
        importlib.import_module(name)


def serve(model_uri: str, host: str, port: int) -> int:
    """Serve `model_uri` on host:port until SIGINT or SIGTERM; return the exit status."""
    import uvicorn

    try:
        app = load_app(model_uri)
    except ServeError as error:
        print(f"mnist-mlops serve: {error}", file=sys.stderr)
        return 1
    print(f"mnist-mlops serve: {model_uri} on http://{host}:{port}", flush=True)
    # On SIGINT or SIGTERM uvicorn finishes the requests in flight, shuts
    # down, then ends the process by that same signal.
    # A port it cannot bind ends it with one logged error and exit status 3.
    uvicorn.run(app, host=host, port=port, log_level="info")
    return 0
