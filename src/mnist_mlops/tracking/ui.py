"""The MLflow UI as a person sees it: descriptions, a saved view of the training runs, direct links.

What headless Chromium showed on `mlflow ui` (MLflow 3.17.2) over this
project's runs, and what the project does about it:

- The experiment's page opens on the GenAI overview (traces, token usage).
  The runs page with `?workflowType=machine_learning` lands on the training
  runs, so that is the link `mnist-mlops ui` prints.
- The runs table shows no metric and no parameter by default (Run Name,
  Created, Dataset, Duration, Source, Models), sorted by start time. A view
  saved in the experiment as the tag `mlflow.sharedViewState.<key>` (the form
  MLflow's own "Views" menu saves) and opened with `viewStateShareKey=<key>`
  sets the columns, their order and the sort. The project saves one,
  `training-runs`: the run's description, test and validation accuracy, and
  the parameters that differ between the runs, best test accuracy first.
- Each run's description (the tag `mlflow.note.content`, the table's
  Description column) says in one line what the run was; the experiment's
  says what its runs are and how to compare them.
- What the project cannot change: the default columns of a runs page opened
  without the view, and the compare page's parallel-coordinates plot, which
  picks its parameters by itself (the first ones by name, even those that only
  some runs have); that page has no saved state to set.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from mnist_mlops.tracking.store import EXPERIMENT_NOTE, NOTE_TAG

VIEW_KEY = "training-runs"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
ALWAYS_SHOWN_PARAMS = ("model.name", "optimizer.name")
MAX_PARAM_COLUMNS = 8


def run_note(
    model: str,
    optimizer: str,
    learning_rate: float,
    epochs: int,
    test_accuracy: float,
    dvc_experiment: str | None,
) -> str:
    """The one-line description of a training run."""
    note = (
        f"{model}, {optimizer} (learning rate {learning_rate:g}), {epochs} epochs: "
        f"test accuracy {test_accuracy:.4f}"
    )
    return f"{note} (DVC experiment {dvc_experiment})" if dvc_experiment else note


def differing_params(runs) -> list[str]:
    """The names of the parameters whose values are not the same in every run, by name."""
    names = sorted({name for run in runs for name in run.data.params})
    return [name for name in names if len({run.data.params.get(name) for run in runs}) > 1]


def training_runs_view(runs) -> dict:
    """The runs table's state: description, accuracies and the differing parameters, best first."""
    params = [*ALWAYS_SHOWN_PARAMS]
    params += [name for name in differing_params(runs) if name not in params]
    columns = [
        "attributes.`Description`",
        "metrics.`test_accuracy`",
        "metrics.`val_accuracy`",
        *(f"params.`{name}`" for name in params[:MAX_PARAM_COLUMNS]),
    ]
    return {
        "searchFilter": "",
        "orderByKey": "metrics.`test_accuracy`",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": columns,
        # Without an order the UI sorts the chosen columns by name.
        "columnOrder": columns,
        "runsHiddenMode": "SHOW_ALL",
    }


def save_view(client, experiment_id: str) -> None:
    """Save (or update) the `training-runs` view in the experiment, from its current runs."""
    runs = client.search_runs([experiment_id], max_results=1000)
    now = int(time.time() * 1000)
    envelope = {
        "name": "Training runs, best test accuracy first",
        "createdAt": now,
        "updatedAt": now,
        "state": json.dumps(training_runs_view(runs)),
    }
    client.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(envelope))


def links(base_url: str, experiment_id: str | None, model_name: str) -> dict[str, str]:
    """Direct links into the UI: the training runs (in the saved view), the experiment's
    models (one per evaluated run, with the metrics measured on each dataset) and the
    registered model."""
    found = {}
    if experiment_id is not None:
        found["training runs"] = (
            f"{base_url}/#/experiments/{experiment_id}/runs"
            f"?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
        )
        found["models"] = (
            f"{base_url}/#/experiments/{experiment_id}/models?workflowType=machine_learning"
        )
    found["registered model"] = f"{base_url}/#/models/{model_name}"
    return found


# A viewer for one person on one machine: MLflow's web app in one uvicorn
# process, started here the way `mlflow ui` starts it (the environment below,
# checked against MLflow's own names by tests/tracking/test_ui.py), without
# `mlflow ui`'s launcher, which holds another 250 MB only to wait for it; no
# GenAI job runner (with its huey consumers), which the project never uses.
# MLflow's defaults make 15 processes and 2.5 GB; this is 2 and under 300 MB.
LOCAL_VIEWER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
SERVER_ENV_NAMES = {
    "backend_store": "_MLFLOW_SERVER_FILE_STORE",
    "registry_store": "_MLFLOW_SERVER_REGISTRY_STORE",
    "artifact_root": "_MLFLOW_SERVER_ARTIFACT_ROOT",
    "serve_artifacts": "_MLFLOW_SERVER_SERVE_ARTIFACTS",
    "artifacts_destination": "_MLFLOW_SERVER_ARTIFACT_DESTINATION",
    "boot_id": "_MLFLOW_SERVER_BOOT_ID",
    "in_job_executor": "_MLFLOW_IN_JOB_EXECUTOR",
    "server_name": "_MLFLOW_SGI_NAME",
}


def viewer_command(store_uri: str, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The command and environment of MLflow's web app on `store_uri`, as `mlflow ui` runs it."""
    import importlib.util
    import uuid

    mlflow_folder = Path(importlib.util.find_spec("mlflow").origin).parent  # not imported
    names = SERVER_ENV_NAMES
    env = {
        **LOCAL_VIEWER_ENV,
        names["backend_store"]: store_uri,
        names["registry_store"]: store_uri,
        names["artifact_root"]: "mlflow-artifacts:/",
        names["serve_artifacts"]: "true",
        names["artifacts_destination"]: "./mlartifacts",
        names["boot_id"]: uuid.uuid4().hex,
        names["in_job_executor"]: "false",
        names["server_name"]: "uvicorn",
    }
    command = [
        *(sys.executable, "-m", "uvicorn"),
        *("--log-config", str(mlflow_folder / "server" / "uvicorn_log_config.yaml")),
        *("--host", host, "--port", str(port), "--workers", "1"),
        "mlflow.server.fastapi_app:app",
    ]
    return command, env


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _wait_for(url: str, process: subprocess.Popen, seconds: float = 120) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    return False


def prepare_store(experiment_name: str) -> str | None:
    """Save the view and the experiment's description in the store; return the experiment id."""
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return None
    if not experiment.tags.get(NOTE_TAG):
        client.set_experiment_tag(experiment.experiment_id, NOTE_TAG, EXPERIMENT_NOTE)
    save_view(client, experiment.experiment_id)
    return experiment.experiment_id


def run_ui(host: str, port: int, experiment_name: str, model_name: str) -> int:
    """`mlflow ui` on the project's store; print the direct links once it answers."""
    from mnist_mlops.paths import MLFLOW_DB_NAME, project_root
    from mnist_mlops.processes import port_taken
    from mnist_mlops.tracking.store import TRACKING_URI_ENV, embedded_store, tracking_uri

    if not embedded_store():
        # A tracking server has a UI of its own: save the view there, print its links.
        experiment_id = prepare_store(experiment_name)
        for name, link in links(
            os.environ[TRACKING_URI_ENV].rstrip("/"), experiment_id, model_name
        ).items():
            print(f"{name}: {link}")
        return 0
    database = project_root() / MLFLOW_DB_NAME
    if not database.exists():
        print(
            f"mnist-mlops ui: no MLflow store at {database}: run `make repro` first",
            file=sys.stderr,
        )
        return 1
    url = f"http://{host}:{port}"
    if taken := port_taken(host, port, "make ui UI_PORT=…, or --port"):
        print(f"mnist-mlops ui: {taken}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _interrupt)
    command, env = viewer_command(f"sqlite:///{database}", host, port)
    process = subprocess.Popen(command, env={**os.environ, **env})
    # The store is prepared meanwhile, by a process that exits: MLflow's client
    # is not kept in memory for the viewer's lifetime.
    prepare = subprocess.Popen(
        [sys.executable, "-m", "mnist_mlops.tracking.ui", tracking_uri(), experiment_name],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        experiment_id = prepare.communicate()[0].strip() or None
        if prepare.returncode:
            print("mnist-mlops ui: the saved view could not be written (above)", file=sys.stderr)
        if _wait_for(url, process):
            print(f"MLflow UI on {url}", flush=True)
            for name, link in links(url, experiment_id, model_name).items():
                print(f"  {name}: {link}", flush=True)
        return process.wait()
    except KeyboardInterrupt:
        return stop_children(prepare, process)


STOP_SECONDS = 20


def stop_children(*children: subprocess.Popen) -> int:
    """Stop the children once, whatever signals follow (make sends its own SIGTERM too).

    Each gets SIGTERM and STOP_SECONDS to exit, then SIGKILL: Ctrl-C always ends
    the viewer. Returns the last child's exit status.
    """
    from mnist_mlops.processes import stop_all

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop_all([child for child in children if child.poll() is None], STOP_SECONDS)
    return children[-1].returncode


if __name__ == "__main__":
    # python -m mnist_mlops.tracking.ui TRACKING_URI EXPERIMENT: prepare, print its id.
    import mlflow

    mlflow.set_tracking_uri(sys.argv[1])
    print(prepare_store(sys.argv[2]) or "")
