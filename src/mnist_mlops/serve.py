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

from mnist_mlops.paths import MLFLOW_DB_NAME, project_root
from mnist_mlops.tracking import TRACKING_URI_ENV, embedded_store, tracking_uri


class ServeError(Exception):
    """The model cannot be served (not found, or its store cannot be read)."""


def load_app(model_uri: str):
    """MLflow's scoring-server app around the model at `model_uri`."""
    database = project_root() / MLFLOW_DB_NAME
    from_the_store = model_uri.startswith(("models:/", "runs:/"))
    if from_the_store and embedded_store() and not database.exists():
        # Opening it would create an empty store here, which helps nobody.
        raise ServeError(
            f"no MLflow store at {database}: run `make repro` first, or set {TRACKING_URI_ENV}"
        )
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
