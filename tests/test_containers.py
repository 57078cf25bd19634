"""The container images, built with buildah and run with podman as a user would run them.

The pipeline image runs a tiny `dvc repro` in a project folder that belongs
to another uid than the images' user (1000), as the host user; the serving
image then serves that project's champion. `.ci/run` prepares the tools
(`eval "$(.ci/containers)"`); elsewhere, without them, these tests skip with
the reason, and under CI they fail instead.
"""

import json
import os
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import yaml

from .conftest import (
    REPO_ROOT,
    compose_config,
    copy_project,
    free_port,
    run,
    tiny_overrides,
    write_mirror,
)

pytestmark = pytest.mark.containers
SERVE_IMAGE = "mnist-mlops-serve"
PIPELINE_IMAGE = "mnist-mlops"
IMAGE_USER = 1000
# The host user who owns the project: anyone but the images' user.
HOST_UID = 1234 if os.geteuid() == 0 else os.geteuid()
CONTAINER_OPTIONS = ("--network", "host", "--user", f"{HOST_UID}:{HOST_UID}")
# podman stop's grace before SIGKILL: the server drains and exits well inside it (about
# 0.3 s here, docs/containers.md); a busy machine must not turn that into a SIGKILL.
STOP_SECONDS = 10


def report(request, line: str) -> None:
    """Print a measured number in the test run's output, even while output is captured."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\ncontainers: {line}", flush=True)


@pytest.fixture(scope="module")
def tools():
    missing = [name for name in ("buildah", "podman") if shutil.which(name) is None]
    if missing or "CONTAINERS_STORAGE_CONF" not in os.environ:
        reason = f"missing {', '.join(missing)}" if missing else "CONTAINERS_STORAGE_CONF unset"
        message = f'{reason}: prepare them with eval "$(.ci/containers)"'
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    if HOST_UID == IMAGE_USER:
        pytest.skip("the tests need a host user other than the images' uid 1000")


def podman(*arguments: str, check: bool = True, timeout: float = 120):
    return run(["podman", *arguments], REPO_ROOT, dict(os.environ), check=check, timeout=timeout)


def build(request, target: str, tag: str) -> None:
    """Build one target; cached layers from earlier builds are reused."""
    mounts = shlex.split(os.environ.get("MNIST_BUILD_MOUNTS", ""))
    command = [
        *("buildah", "bud", "--pull=never", "--isolation", "chroot", "--network", "host"),
        *("--format", "docker", "--layers", *mounts, "--target", target, "-t", tag, "."),
    ]
    started = time.monotonic()
    run(command, REPO_ROOT, dict(os.environ), timeout=1800)
    size = int(podman("image", "inspect", tag, "--format", "{{.Size}}").stdout)
    report(request, f"{tag}: {size / 1e6:.0f} MB, built in {time.monotonic() - started:.0f} s")


@pytest.fixture(scope="module")
def images(tools, request):
    build(request, "serve", SERVE_IMAGE)
    build(request, "pipeline", PIPELINE_IMAGE)
    # What the previous builds left untagged; the layers in use stay cached. Housekeeping
    # of the build cache, not what is tested: a prune that fails is shown, not fatal.
    pruned = podman("image", "prune", "--force", check=False)
    if pruned.returncode != 0:
        report(request, f"podman image prune failed: {pruned.stderr.strip()[-300:]}")


@pytest.fixture(scope="module")
def project(images, tmp_path_factory):
    """A tiny project trained by `dvc repro` inside the pipeline image, as the host user."""
    root = tmp_path_factory.mktemp("containers")
    write_mirror(root / "mirror")
    directory = copy_project(root / "project")
    params = compose_config(*tiny_overrides("/mirror"), "train.epochs=1")
    (directory / "params.yaml").write_text(yaml.safe_dump(params))
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", f"{HOST_UID}:{HOST_UID}", str(directory)], check=True)
    result = podman(
        *("run", "--rm", *CONTAINER_OPTIONS, "-e", "MNIST_MIRROR=/mirror"),
        *("-v", f"{root / 'mirror'}:/mirror:ro", "-v", f"{directory}:{directory}"),
        *("-w", str(directory), PIPELINE_IMAGE),
        timeout=900,
    )
    assert "Running stage 'evaluate'" in result.stdout + result.stderr
    return directory


def test_the_pipeline_image_runs_dvc_repro_into_the_project_as_its_owner(project):
    metrics = project / "reports" / "metrics.json"
    assert 0 <= json.loads(metrics.read_text())["test_accuracy"] <= 1
    for path in (metrics, project / "mlflow.db", project / "models" / "model.onnx"):
        assert path.stat().st_uid == HOST_UID, path
    assert (project / "dvc.lock").exists()


def get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def serve_options(project, port: int, mount: str = "") -> list[str]:
    """The README's way: the project mounted at its own path (`mount`: e.g. ":ro")."""
    return [
        *("-e", f"MNIST_SERVE_PORT={port}", "-v", f"{project}:{project}{mount}"),
        *("-w", str(project), SERVE_IMAGE),
    ]


@pytest.fixture(scope="module")
def server(project, request):
    """The serving image on the project's champion, started as the host user; yields its URL."""
    port, name = free_port(), f"mnist-serve-{os.getpid()}"
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    podman("run", "--detach", "--name", name, *CONTAINER_OPTIONS, *serve_options(project, port))
    try:
        while True:
            try:
                get(f"{url}/ping")
                break
            except (urllib.error.URLError, ConnectionError):
                state = podman("inspect", name, "--format", "{{.State.Status}}").stdout.strip()
                if state != "running" or time.monotonic() - started > 120:
                    pytest.fail(f"{state} after {time.monotonic() - started:.0f} s:\n{logs(name)}")
                time.sleep(0.05)
        elapsed = time.monotonic() - started
        report(request, f"{SERVE_IMAGE}: first /ping answered {elapsed:.1f} s after podman run")
        yield name, url
    finally:
        podman("rm", "--force", name, check=False)


def logs(name: str) -> str:
    result = podman("logs", name, check=False)
    return result.stdout + result.stderr


def test_the_serving_image_serves_the_champion_as_a_non_root_user(server):
    name, url = server
    assert get(f"{url}/ping") == 200
    status, answer = post(url, {"inputs": [[[0] * 28] * 28]})
    assert status == 200 and 0 <= answer["predictions"][0]["digit"] <= 9
    status, answer = post(url, {"inputs": [[[999] * 28] * 28]})
    assert status == 400 and "255" in answer["message"]
    assert podman("exec", name, "id", "-u").stdout.strip() == str(HOST_UID)
    user = podman("image", "inspect", SERVE_IMAGE, "--format", "{{.Config.User}}").stdout
    assert user.strip() == str(IMAGE_USER)


def test_the_serving_image_holds_no_tensorflow_and_passes_its_healthcheck(server):
    name, _url = server
    assert podman("healthcheck", "run", name, check=False).returncode == 0, logs(name)
    probe = "import importlib.util as u; print(u.find_spec('tensorflow'), u.find_spec('dvc'))"
    assert podman("exec", name, "python", "-c", probe).stdout.split() == ["None", "None"]


def test_podman_stop_ends_the_server_by_sigterm(server, request):
    name, _url = server
    started = time.monotonic()
    # podman sends SIGKILL after --time seconds: exit 143 says SIGTERM ended it first.
    podman("stop", "--time", str(STOP_SECONDS), name)
    elapsed = time.monotonic() - started
    report(request, f"{SERVE_IMAGE}: podman stop took {elapsed:.2f} s")
    exit_code = podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip()
    assert exit_code == "143", f"exit {exit_code} (137 is SIGKILL)\n{logs(name)}"
    assert elapsed < STOP_SECONDS
    assert "Finished server process" in logs(name)


@pytest.mark.parametrize(
    ("user", "mount", "problem"),
    [
        (str(IMAGE_USER), "", f"belongs to uid {HOST_UID}, not to uid {IMAGE_USER}"),
        (f"{HOST_UID}:{HOST_UID}", ":ro", "is on a read-only mount"),
    ],
    ids=["foreign-owned", "read-only"],
)
def test_a_store_the_server_cannot_write_gets_one_line(project, user, mount, problem):
    result = podman(
        *("run", "--rm", "--network", "host", "--user", user),
        *serve_options(project, free_port(), mount),
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if "level=" not in line]
    (line,) = lines
    assert line.startswith("mnist-mlops serve: cannot open the MLflow store") and problem in line
    assert "--user" in line
