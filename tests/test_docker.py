"""The Dockerfile: no engine runs here, so it is linted and checked against the README's install."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet

from .conftest import REPO_ROOT

DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text()


def instructions(keyword: str) -> list[str]:
    joined = DOCKERFILE.replace("\\\n", " ")
    return [
        line.split(None, 1)[1] for line in joined.splitlines() if line.startswith(keyword + " ")
    ]


def test_hadolint_finds_nothing():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--no-color", "Dockerfile"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_a_pinned_slim_python_the_project_supports():
    (base,) = instructions("FROM")
    match = re.fullmatch(r"python:(\d+\.\d+\.\d+)-slim-\w+", base)
    assert match, f"base image {base!r} is not a pinned slim Python"
    requires = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert match.group(1) in SpecifierSet(requires["requires-python"])


def test_image_installs_the_same_lock_file_as_make_install():
    makefile = (REPO_ROOT / "Makefile").read_text()
    readme = (REPO_ROOT / "README.md").read_text()
    assert "pip install --quiet --disable-pip-version-check -r requirements-lock.txt" in makefile
    assert "make test" in readme and "docker build" in readme
    runs = instructions("RUN")
    assert any("pip install -r requirements-lock.txt" in command for command in runs)
    assert any("pip install --no-deps ." in command for command in runs)
    copied = " ".join(instructions("COPY"))
    assert "requirements-lock.txt" in copied and "src" in copied


def test_image_runs_unprivileged_and_serves_on_the_exposed_port():
    (user,) = instructions("USER")
    assert user not in ("root", "0")
    assert instructions("EXPOSE") == ["5000"]
    assert instructions("ENTRYPOINT") == ['["mnist-mlops"]']
    assert instructions("CMD") == ['["serve"]']


def test_dockerignore_keeps_data_stores_and_environments_out():
    ignored = set((REPO_ROOT / ".dockerignore").read_text().split())
    for entry in ("data", "mlflow.db*", "mlartifacts", ".venv", ".dvc/cache", ".git"):
        assert entry in ignored, entry
