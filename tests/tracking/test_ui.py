"""The MLflow UI in a real browser: Debian's Chromium, driven by Selenium, on `mnist-mlops ui`.

The store is made by two `dvc exp run`s on tiny data. Each test saves what
the browser showed into a folder it prints. `.ci/run` installs `chromium` and
`chromium-driver`; elsewhere, without them, these tests skip with the reason,
and under CI they fail.
"""

import json
import re
import shutil
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

from mnist_mlops.pipeline.figures import mistakes_image, most_confident_mistakes
from mnist_mlops.tracking.ui import (
    SERVER_ENV_NAMES,
    differing_params,
    run_note,
    training_runs_view,
)

from ..conftest import (
    TINY_DATA,
    copy_project,
    descendants,
    free_port,
    run,
    serving,
    subprocess_env,
    unavailable,
    write_mirror,
)

TINY = (*TINY_DATA, "train.batch_size=32")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PAGE_SECONDS = 60


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory, request):
    directory = tmp_path_factory.mktemp("ui-screenshots")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\nui: screenshots of what the browser showed are in {directory}", flush=True)
    return directory


@pytest.fixture(scope="module")
def browser():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if shutil.which(path) is None]
    if missing:
        unavailable(f"{', '.join(missing)} missing (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    # Wide enough for every column: the table draws only the columns in view.
    options.add_argument("--window-size=2600,1000")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def store(tmp_path_factory, browser):
    """A project with two experiments' runs, and `mnist-mlops ui` on it; yields its links."""
    project = copy_project(tmp_path_factory.mktemp("ui") / "clone")
    write_mirror(project.parent / "mirror")
    env = subprocess_env(MNIST_MIRROR=str(project.parent / "mirror"))
    base = [f"-S{override}" for override in (*TINY, "train.epochs=2")]
    run(["dvc", "exp", "run", *base, "-n", "first-mlp"], project, env)
    run(["dvc", "exp", "run", *base, "-Soptimizer=adam", "-n", "second-adam"], project, env)
    port, log = free_port(), project.parent / "ui.log"
    command = [sys.executable, "-m", "mnist_mlops", "ui", "--port", str(port)]
    with serving(command, env, f"http://127.0.0.1:{port}", "/health", project, log):
        deadline = time.monotonic() + 30
        while "registered model:" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        printed = dict(
            re.findall(
                r"^\s+(training runs|models|registered model): (\S+)$", log.read_text(), re.M
            )
        )
        client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
        yield printed, client, client.get_experiment_by_name("mnist")


def wait_for_text(driver, *texts: str) -> str:
    """Wait until the page shows every one of `texts`; return the page's text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(page):
        body = page.find_element(By.TAG_NAME, "body").text
        return body if all(text in body for text in texts) else False

    try:
        return WebDriverWait(driver, PAGE_SECONDS, poll_frequency=0.5).until(shown)
    except Exception:
        body = driver.find_element(By.TAG_NAME, "body").text
        pytest.fail(f"{driver.current_url} never showed {texts}; it showed:\n{body[:3000]}")


def runs_of(store):
    _printed, client, experiment = store
    runs = client.search_runs([experiment.experiment_id])
    return {found.info.run_name: found for found in runs}


@pytest.mark.heavy
def test_the_printed_link_lands_on_the_training_runs_with_their_test_accuracy(
    store, browser, screenshots
):
    printed, _client, experiment = store
    link = printed["training runs"]
    assert f"/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning" in link
    browser.get(link)
    runs = runs_of(store)
    assert set(runs) == {"first-mlp", "second-adam"}
    page = wait_for_text(browser, "first-mlp", "second-adam", "test_accuracy", "val_accuracy")
    browser.save_screenshot(str(screenshots / "training-runs.png"))
    from selenium.webdriver.common.by import By

    headers = [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "[role=columnheader]")]
    for column in ("Description", "test_accuracy", "val_accuracy", "model.name", "optimizer.name"):
        assert column in headers, headers
    # The grid draws a row in parts (pinned name, scrolling cells), each with the row's index.
    rows: dict[str, str] = {}
    for part in browser.find_elements(By.CSS_SELECTOR, ".ag-row[row-index]"):
        index = part.get_attribute("row-index")
        rows[index] = f"{rows.get(index, '')}\n{part.text}"
    for name, logged in runs.items():
        accuracy = f"{logged.data.metrics['test_accuracy']:g}"[:4]
        (row,) = [text for text in rows.values() if name in text]
        assert accuracy in row, (name, accuracy, row)
        assert logged.data.tags["mlflow.note.content"].split(":")[0] in page
    assert "GenAI overview" not in page and "Token Usage" not in page


@pytest.mark.heavy
def test_the_models_link_lists_one_model_a_run_by_its_test_accuracy_on_the_test_data(
    store, browser, screenshots
):
    """MLflow 3's model view: a row per evaluated run, test accuracy under the test dataset."""
    from selenium.webdriver.common.by import By

    printed, client, experiment = store
    browser.get(printed["models"])
    runs = runs_of(store)
    page = wait_for_text(browser, "classifier", "test_accuracy", *runs)
    browser.save_screenshot(str(screenshots / "models.png"))
    models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    assert sorted(model.source_run_id for model in models) == sorted(
        found.info.run_id for found in runs.values()
    )
    (test_digest,) = {
        metric.dataset_digest
        for model in models
        for metric in model.metrics
        if metric.key == "test_accuracy"
    }
    assert f"mnist-test (#{test_digest})" in page
    rows: dict[str, str] = {}
    for part in browser.find_elements(By.CSS_SELECTOR, ".ag-row[row-index]"):
        index = part.get_attribute("row-index")
        rows[index] = f"{rows.get(index, '')}\n{part.text}"
    # The grid may draw an empty filler row below the models.
    rows = {index: text for index, text in rows.items() if text.strip()}
    assert len(rows) == len(runs), rows
    for name, logged in runs.items():
        version = logged.data.tags["registry.version"]
        (row,) = [text for text in rows.values() if name in text]
        assert f"mnist-classifier\nv{version}" in row, row
        assert f"{logged.data.metrics['test_accuracy']:g}"[:4] in row, row

    # A model's page: its metrics, each with the dataset and DVC hash it was measured on.
    (first,) = [model for model in models if model.source_run_id == runs["first-mlp"].info.run_id]
    base = _ui_root(store)
    browser.get(f"{base}/#/experiments/{experiment.experiment_id}/models/{first.model_id}")
    note = runs["first-mlp"].data.tags["mlflow.note.content"]
    page = wait_for_text(browser, "val_accuracy", "test_accuracy_digit_9", note)
    browser.save_screenshot(str(screenshots / "model.png"))
    for metric in first.metrics:
        assert f"{metric.dataset_name} (#{metric.dataset_digest})" in page
    assert "cpu_utilization" not in page


@pytest.mark.heavy
def test_a_run_shows_its_figures_and_its_system_metrics(store, browser, screenshots, tmp_path):
    _printed, client, experiment = store
    run_id = runs_of(store)["second-adam"].info.run_id
    base = f"{_ui_root(store)}/#/experiments/{experiment.experiment_id}/runs/{run_id}"
    browser.get(f"{base}/artifacts")
    wait_for_text(browser, "confusion_matrix.png", "mistakes.png")
    for figure in ("confusion_matrix.png", "mistakes.png"):
        with Image.open(client.download_artifacts(run_id, figure, str(tmp_path))) as image:
            width = image.size[0]
        show_image(browser, figure, width)
        browser.save_screenshot(str(screenshots / f"run-{figure}"))
    browser.get(f"{base}/system-metrics")
    wait_for_text(browser, "cpu_utilization_percentage", "disk_usage_percentage")
    browser.save_screenshot(str(screenshots / "run-system-metrics.png"))


def show_image(driver, name: str, width: int) -> None:
    """Open an image artifact in the run's artifact browser; wait until it is drawn.

    The preview is an <img> of a blob: URL, so the image is known by its width.
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.XPATH, f"//*[normalize-space(text())='{name}']").click()

    def drawn(page):
        widths = [
            page.execute_script("return arguments[0].naturalWidth", image)
            for image in page.find_elements(By.CSS_SELECTOR, "img[src^='blob:']")
        ]
        return width in widths

    try:
        WebDriverWait(driver, PAGE_SECONDS, poll_frequency=0.5).until(drawn)
    except Exception:
        pytest.fail(f"{name} ({width} px wide) was not drawn on {driver.current_url}")


def _ui_root(store) -> str:
    printed, _client, _experiment = store
    return printed["registered model"].split("/#/")[0]


@pytest.mark.heavy
def test_the_registered_model_page_shows_the_champion(store, browser, screenshots):
    printed, client, _experiment = store
    champion = client.get_model_version_by_alias("mnist-classifier", "champion")
    browser.get(printed["registered model"])
    wait_for_text(browser, "mnist-classifier", "@ champion", f"Version {champion.version}")
    browser.save_screenshot(str(screenshots / "registered-model.png"))


@pytest.mark.heavy
def test_the_compare_view_of_the_two_runs_loads(store, browser, screenshots):
    _printed, _client, experiment = store
    runs = runs_of(store)
    ids = json.dumps([found.info.run_id for found in runs.values()])
    query = urllib.parse.urlencode(
        {"runs": ids, "experiments": json.dumps([experiment.experiment_id])}
    )
    browser.get(f"{_ui_root(store)}/#/compare-runs?{query}")
    wait_for_text(browser, "Comparing 2 Runs", "first-mlp", "second-adam", "optimizer.name")
    browser.save_screenshot(str(screenshots / "compare.png"))


@pytest.mark.heavy
def test_the_viewer_is_mlflow_s_web_app_alone_without_a_launcher_or_job_runner(store):
    printed, _client, _experiment = store
    port = urllib.parse.urlsplit(printed["registered model"]).port
    (ui,) = [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and f"ui\0--port\0{port}\0" in command_line(entry.name)
    ]
    below = [command_line(pid) for pid in descendants(ui) - {ui}]
    assert len(below) == 1, below
    assert "\0uvicorn\0" in below[0] and below[0].endswith("mlflow.server.fastapi_app:app\0")


def command_line(pid) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    except OSError:
        return ""


def test_the_viewer_sets_the_environment_mlflow_ui_sets():
    """`mnist-mlops ui` starts MLflow's app itself: the names it sets are MLflow's own."""
    import mlflow.environment_variables as settings
    import mlflow.server as server

    assert {
        "backend_store": server.BACKEND_STORE_URI_ENV_VAR,
        "registry_store": server.REGISTRY_STORE_URI_ENV_VAR,
        "artifact_root": server.ARTIFACT_ROOT_ENV_VAR,
        "serve_artifacts": server.SERVE_ARTIFACTS_ENV_VAR,
        "artifacts_destination": server.ARTIFACTS_DESTINATION_ENV_VAR,
        "boot_id": settings._MLFLOW_SERVER_BOOT_ID.name,
        "in_job_executor": settings._MLFLOW_IN_JOB_EXECUTOR.name,
        "server_name": settings._MLFLOW_SGI_NAME.name,
    } == SERVER_ENV_NAMES


class _Run:
    def __init__(self, **params):
        self.data = type("Data", (), {"params": params})()


def test_the_view_shows_the_parameters_that_differ_best_first():
    runs = [
        _Run(**{"model.name": "mlp", "optimizer.name": "adam", "train.epochs": "5"}),
        _Run(
            **{
                "model.name": "cnn",
                "optimizer.name": "adam",
                "train.epochs": "5",
                "model.filters": "32",
            }
        ),
    ]
    assert differing_params(runs) == ["model.filters", "model.name"]
    view = training_runs_view(runs)
    assert view["selectedColumns"] == [
        "attributes.`Description`",
        "metrics.`test_accuracy`",
        "metrics.`val_accuracy`",
        "params.`model.name`",
        "params.`optimizer.name`",
        "params.`model.filters`",
    ]
    assert view["columnOrder"] == view["selectedColumns"]
    assert (view["orderByKey"], view["orderByAsc"]) == ("metrics.`test_accuracy`", False)


def test_a_run_note_says_what_the_run_was_in_one_line():
    note = run_note("cnn", "adam", 0.001, 10, 0.99391, "cnn-fast")
    assert note == (
        "cnn, adam (learning rate 0.001), 10 epochs: test accuracy 0.9939 (DVC experiment cnn-fast)"
    )
    assert "\n" not in run_note("mlp", "rmsprop", 0.001, 5, 0.9784, None)


def test_the_mistakes_figure_shows_the_most_confident_mistakes_first():
    import numpy as np

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=200)
    probabilities = rng.dirichlet(np.ones(10), size=200)
    images = rng.integers(0, 256, size=(200, 28, 28), dtype=np.uint8)
    chosen = most_confident_mistakes(labels, probabilities)
    predicted = probabilities.argmax(axis=1)
    assert len(chosen) == 25 and all(predicted[chosen] != labels[chosen])
    confidence = probabilities[chosen, predicted[chosen]]
    assert all(confidence[:-1] >= confidence[1:])
    wrong = predicted != labels
    assert confidence[-1] >= np.sort(probabilities[wrong].max(axis=1))[-25]
    image = mistakes_image(images, labels, probabilities)
    assert image.size[0] > 5 * 84 and image.size[1] > 5 * 84
    assert len(most_confident_mistakes(labels, np.eye(10)[labels])) == 0
    assert mistakes_image(images, labels, np.eye(10)[labels]).size[1] < image.size[1] / 3
