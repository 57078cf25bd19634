"""The README's tour and its batch scoring, run verbatim in a fresh clone, nothing activated.

Every command of the tour's fenced blocks runs exactly as written, in
order, with `bash`, in a `git clone` of this repository whose `PATH` holds
the system's folders alone (no `.venv/bin`, no Python with the project's
packages). The servers the tour starts (`make ui`, `make serve`) run in the
background until the end. A command that exits non-zero or prints a
traceback fails the test. The clone shares this checkout's `.venv` (a
symlink), so the install is not timed here; on real MNIST (the offline
mirror) the tour trains twice.
"""

import os
import re
import signal
import subprocess
import time
import urllib.request

import pytest

from .conftest import REAL_MNIST, REPO_ROOT

# The long-running commands of the tour, and the URL that says each is up.
SERVERS = {"make ui": "http://127.0.0.1:5050/health", "make serve": "http://127.0.0.1:5000/ping"}


def commands_in(text: str) -> list[str]:
    """The commands of the fenced bash blocks in `text`, in order, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        commands += re.sub(r"\\\n", "", block).strip().splitlines()
    return commands


def tour_commands() -> list[str]:
    """The README's tour, then its section on scoring a whole dataset (which needs the champion)."""
    readme = (REPO_ROOT / "README.md").read_text()
    tour = readme.split("--8<-- [start:tour]")[1].split("--8<-- [end:tour]")[0]
    scoring = readme.split("## Scoring a whole dataset")[1].split("\n## ")[0]
    return commands_in(tour) + commands_in(scoring)


def shell(clone, env) -> dict:
    return {"cwd": clone, "env": env, "stdin": subprocess.DEVNULL, "text": True}


def wait_for(url: str, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{url}: the server exited ({process.returncode})"
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {seconds} s")


@pytest.mark.slow
@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason=f"real MNIST mirror not found at {REAL_MNIST}")
def test_the_readme_tour_runs_verbatim_with_nothing_activated(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True)
    (clone / ".venv").symlink_to(REPO_ROOT / ".venv")
    # Fresh files are newer than the shared .venv's markers: age them, so that
    # make sees the install as done instead of installing into the shared .venv.
    for name in os.listdir(clone):
        if name.startswith("requirements") or name == "pyproject.toml":
            os.utime(clone / name, (0, 0))
    for name in ("package.json", "package-lock.json"):
        os.utime(clone / "docs" / "javascripts" / name, (0, 0))
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "MNIST_MIRROR": str(REAL_MNIST),
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        # A user's git knows who they are; this HOME has no .gitconfig.
        "GIT_AUTHOR_NAME": "Tour",
        "GIT_AUTHOR_EMAIL": "tour@example.invalid",
        "GIT_COMMITTER_NAME": "Tour",
        "GIT_COMMITTER_EMAIL": "tour@example.invalid",
    }
    commands = tour_commands()
    assert commands[0] == "make repro" and any(c.startswith("make serve") for c in commands)
    servers: list[subprocess.Popen] = []
    outputs = []
    try:
        for command in commands:
            started = time.monotonic()
            server = next((url for name, url in SERVERS.items() if command.startswith(name)), None)
            if server:
                log = open(tmp_path / f"server-{len(servers)}.log", "w")  # noqa: SIM115
                servers.append(
                    subprocess.Popen(
                        ["bash", "-c", command],
                        **shell(clone, env),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
                wait_for(server, servers[-1], 300)
                continue
            done = subprocess.run(
                ["bash", "-c", command], **shell(clone, env), capture_output=True, timeout=1200
            )
            output = done.stdout + done.stderr
            outputs.append(f"$ {command}  ({time.monotonic() - started:.0f} s)\n{output}")
            assert done.returncode == 0 and "Traceback" not in output, "\n".join(outputs)
    finally:
        for server in servers:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
    transcript = "\n".join(outputs)
    assert '"test_accuracy": 0.97' in transcript or '"test_accuracy": 0.98' in transcript
    assert "digit.png: 7 (probability" in transcript
    assert "wrote 10000 images in the batch format to scans.parquet" in transcript
    assert (clone / "predictions").is_dir() and (clone / "predictions-spark").is_dir()
    assert (clone / "params.yaml").read_text() == (REPO_ROOT / "params.yaml").read_text()
