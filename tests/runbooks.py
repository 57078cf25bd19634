"""The docs' command blocks, read and run as a user runs them: in order, in one shell.

A fenced `bash` block is run line by line (continuation lines joined,
comment lines skipped) by `Terminal`, which keeps what a command exports
for the next one, as one terminal does: `eval "$(… --keys NAME)"` on one
line reaches the server started on the next. A command that starts a
long-running server (`SERVERS`) runs in the background, as in a second
terminal, until `stop_servers`.

A block that cannot run as written says so just above its fence, in an
HTML comment the site does not show:

    <!-- runbook: not run: the request id is a placeholder -->

`sudo apt-get install …` lines are not run (the test is not root); the
packages they name must already be installed, as `.ci/run` installs them.
"""

import os
import re
import shlex
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

SKIP = re.compile(r"<!-- runbook: not run: (.+?) -->\s*$")

# The servers the docs start, and what says each is up: a URL that answers
# (any HTTP status: a login page is an answer), or a line in its output.
SERVERS = {
    "make ui": "http://127.0.0.1:5050/health",
    "make serve": "http://127.0.0.1:5000/ping",
    "make monitoring": "http://127.0.0.1:9090/-/ready",
    ".venv/bin/mnist-mlops object-store --users": "object store ready",
    ".venv/bin/mnist-mlops tracking-server": "http://127.0.0.1:5001/health",
}


@dataclass
class Block:
    commands: list[str]
    skipped: str | None  # why it is not run, as the docs say


def blocks(text: str) -> list[Block]:
    """The fenced bash blocks of `text`, in order, indented ones (in lists) included."""
    found = []
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if line.strip() != "```bash":
            continue
        indent = line[: len(line) - len(line.lstrip())]
        end = lines.index(f"{indent}```", number + 1)
        body = "\n".join(row[len(indent) :] for row in lines[number + 1 : end])
        body = re.sub(r"\\\n\s*", "", body)
        commands = [row for row in body.splitlines() if row.strip() and not row.startswith("#")]
        before = next((row for row in reversed(lines[:number]) if row.strip()), "")
        marked = SKIP.search(before)
        found.append(Block(commands, marked.group(1) if marked else None))
    return found


def section(text: str, start: str, end: str) -> str:
    """The part of `text` from the first `start` to the next `end`."""
    return text.split(start, 1)[1].split(end, 1)[0]


def installed(package: str) -> bool:
    done = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
    )
    return done.stdout.endswith("installed")


class Terminal:
    """One user's shell in `folder`: what a command exports stays for the next."""

    def __init__(self, folder: Path, env: dict, scratch: Path):
        self.folder, self.env, self.scratch = folder, env, scratch
        self.state = scratch / "exports.sh"
        self.state.write_text("")
        self.servers: list[tuple[str, subprocess.Popen, Path]] = []
        self.transcript: list[str] = []

    def _script(self, command: str) -> list[str]:
        state = shlex.quote(str(self.state))
        keep = f"status=$?; export -p > {state}; exit $status"
        return ["bash", "-c", f"source {state}\n{command}\n{keep}"]

    def run(self, command: str) -> str:
        """Run one command as written; fail on a non-zero exit or a traceback. Return its output."""
        if command.startswith("sudo apt-get install "):
            missing = [name for name in command.split()[3:] if not installed(name)]
            assert not missing, f"{command}: not installed here: {missing}"
            return ""
        ready = next((sign for prefix, sign in SERVERS.items() if command.startswith(prefix)), None)
        if ready:
            self.start(command, ready)
            return ""
        started = time.monotonic()
        done = subprocess.run(
            self._script(command),
            cwd=self.folder,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        output = done.stdout + done.stderr
        self.transcript.append(f"$ {command}  ({time.monotonic() - started:.0f} s)\n{output}")
        assert done.returncode == 0 and "Traceback" not in output, self.tail()
        return output

    def run_blocks(self, found: list[Block]) -> None:
        for block in found:
            if block.skipped is None:
                for command in block.commands:
                    self.run(command)

    def start(self, command: str, ready: str) -> None:
        """Start a server in the background, as in a second terminal; wait until it is up."""
        log = self.scratch / f"server-{len(self.servers)}.log"
        with open(log, "w") as output:
            process = subprocess.Popen(
                # exec: the server itself, not a shell waiting on it, gets the signal.
                ["bash", "-c", f"source {shlex.quote(str(self.state))}\nexec {command}"],
                cwd=self.folder,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.servers.append((command, process, log))
        self.transcript.append(f"$ {command}  (in the background, {log.name})")
        deadline = time.monotonic() + 300
        while not answers(ready, log):
            assert process.poll() is None, f"{command} exited:\n{log.read_text()[-3000:]}"
            if time.monotonic() > deadline:
                pytest.fail(f"{command}: not up after 300 s ({ready})\n{log.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop_servers(self) -> None:
        """Stop every server (SIGTERM to its process group); fail on a traceback in any log."""
        servers, self.servers = self.servers, []
        for _command, process, _log in servers:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for command, process, log in servers:
            process.wait(timeout=60)
            assert "Traceback" not in log.read_text(), f"{command}:\n{log.read_text()[-3000:]}"

    def tail(self) -> str:
        return "\n".join(self.transcript[-6:])[-6000:]


def answers(ready: str, log: Path) -> bool:
    if not ready.startswith("http"):
        return ready in log.read_text()
    try:
        urllib.request.urlopen(ready, timeout=2).close()
    except urllib.error.HTTPError:
        return True  # up, and asking for a login
    except OSError:
        return False
    return True
