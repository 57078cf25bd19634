"""The Dockerfile: no engine runs here, so it is linted and checked against the README's install."""

import ast
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from .conftest import REPO_ROOT, free_port

DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text()


def stages() -> dict[str, str]:
    """Each build stage's text, by its name (`FROM … AS name`)."""
    found = {}
    for block in re.split(r"^(?=FROM )", DOCKERFILE, flags=re.MULTILINE)[1:]:
        found[block.split()[3]] = block
    return found


def instructions(keyword: str, text: str = DOCKERFILE) -> list[str]:
    joined = text.replace("\\\n", " ")
    return [
        line.split(None, 1)[1] for line in joined.splitlines() if line.startswith(keyword + " ")
    ]


def lock(name: str) -> dict[str, str]:
    lines = (REPO_ROOT / name).read_text().splitlines()
    return dict(line.lower().split("==") for line in lines if "==" in line)


def test_hadolint_finds_nothing():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--no-color", "Dockerfile"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_a_pinned_slim_python_the_project_supports():
    base = instructions("FROM")[0]
    match = re.fullmatch(r"python:(\d+\.\d+\.\d+)-slim-\w+ AS base", base)
    assert match, f"base image {base!r} is not a pinned slim Python"
    requires = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert match.group(1) in SpecifierSet(requires["requires-python"])
    assert instructions("FROM")[1:] == ["base AS serve", "base AS pipeline"]


def test_pipeline_image_installs_the_same_lock_file_as_make_install():
    makefile = (REPO_ROOT / "Makefile").read_text()
    readme = (REPO_ROOT / "README.md").read_text()
    containers = (REPO_ROOT / "docs" / "containers.md").read_text()
    assert "$(UV) -r requirements-lock.txt" in makefile
    assert "make test" in readme and "docker build" in containers
    pipeline = stages()["pipeline"]
    runs = instructions("RUN", pipeline)
    assert any("pip install -r requirements-lock.txt" in command for command in runs)
    assert any("pip install --no-deps ." in command for command in runs)
    copied = " ".join(instructions("COPY", pipeline))
    assert "requirements-lock.txt" in copied and "src" in copied


def test_the_environment_holds_every_pin_of_the_lock_at_its_version():
    """`make install` (uv) installed exactly what the lock pins, as pip did."""
    pins = {
        canonicalize_name(name): version for name, version in lock("requirements-lock.txt").items()
    }
    installed = {
        canonicalize_name(dist.metadata["Name"]): dist.version
        for dist in importlib.metadata.distributions()
    }
    assert len(pins) > 200
    wrong = {
        name: (version, installed.get(name))
        for name, version in pins.items()
        if installed.get(name) != version
    }
    assert not wrong, wrong


def test_the_environment_holds_the_bytecode_of_what_every_process_imports():
    """`make install` compiled it: with PYTHONDONTWRITEBYTECODE set, nothing else would."""
    for name in ("tensorflow", "keras", "mlflow", "mlflow.store.tracking.sqlalchemy_store"):
        source = Path(importlib.util.find_spec(name).origin)
        compiled = Path(importlib.util.cache_from_source(str(source)))
        assert compiled.exists(), f"no bytecode for {source}"


def test_serving_image_installs_only_the_serving_pins_and_no_tensorflow():
    serve = stages()["serve"]
    runs = instructions("RUN", serve)
    assert any(
        "--no-deps -r requirements-serve.txt" in command and "pip check" in command
        for command in runs
    )
    assert "requirements-lock.txt" not in serve
    serving, locked = lock("requirements-serve.txt"), lock("requirements-lock.txt")
    # One tested set: every serving pin is the lock file's.
    assert {name: locked.get(name) for name in serving} == serving
    for absent in ("tensorflow", "keras", "dvc", "hydra-core", "mlflow", "tf2onnx", "onnx"):
        assert absent not in serving, absent
    for present in ("mlflow-skinny", "onnxruntime", "numpy", "pandas", "uvicorn"):
        assert present in serving, present


def test_images_run_unprivileged_under_tini_and_serve_on_the_exposed_port():
    for name in ("serve", "pipeline"):
        (user,) = instructions("USER", stages()[name])
        assert user not in ("root", "0"), name
    serve, pipeline = stages()["serve"], stages()["pipeline"]
    assert instructions("ENTRYPOINT", serve) == ['["tini", "--", "mnist-mlops"]']
    assert instructions("CMD", serve) == ['["serve"]']
    assert instructions("ENTRYPOINT", pipeline) == ['["tini", "-g", "--"]']
    assert instructions("CMD", pipeline) == ['["dvc", "repro"]']
    assert "tini" in " ".join(instructions("RUN", stages()["base"]))
    assert instructions("EXPOSE") == ["5000"]


def test_the_serving_image_checks_its_health_with_the_standard_library_only():
    (healthcheck,) = instructions("HEALTHCHECK", stages()["serve"])
    assert healthcheck.endswith('CMD ["python", "-m", "mnist_mlops.serving.healthcheck"]')
    source = (REPO_ROOT / "src" / "mnist_mlops" / "serving" / "healthcheck.py").read_text()
    imported = {
        name.split(".")[0]
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in (
            [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
        )
    }
    assert imported and imported <= sys.stdlib_module_names, imported - sys.stdlib_module_names


def test_the_healthcheck_fails_with_the_address_when_no_server_answers():
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "mnist_mlops.serving.healthcheck"],
        env={**os.environ, "MNIST_SERVE_PORT": str(port)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"http://127.0.0.1:{port}/ping: ")


def test_dockerignore_keeps_data_stores_and_environments_out():
    ignored = set((REPO_ROOT / ".dockerignore").read_text().split())
    for entry in ("data", "mlflow.db*", "mlartifacts", ".venv", ".dvc/cache", ".git"):
        assert entry in ignored, entry
