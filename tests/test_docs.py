"""The README and the docs site: small front page, every page reachable, every command real."""

import re
import shlex
import sys
import urllib.request
from pathlib import Path

import pytest

from mnist_mlops.__main__ import parser

from .conftest import REPO_ROOT, free_port, serving, subprocess_env

DOCS = REPO_ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
FENCE = re.compile(r"^[ \t]*```(?:bash|console|sh)\n(.*?)^[ \t]*```", re.M | re.S)


def shell_lines(path) -> list[str]:
    """The command lines of a file's shell blocks: continuations joined, comments dropped."""
    lines = []
    for block in FENCE.findall(path.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            command = re.split(r"\s+#\s", line.strip(), maxsplit=1)[0].strip()
            if command and not command.startswith("#"):
                lines.append(command)
    return lines


def commands_of(program: str) -> list[tuple[str, list[str]]]:
    """Every use of `program` in the README and the docs, as (file, arguments)."""
    found = []
    for path in [REPO_ROOT / "README.md", *PAGES]:
        for line in shell_lines(path):
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split = True
            words = []
            for token in [*lexer, ";"]:
                if token.strip(";&|"):
                    words.append(token)
                    continue
                while words and re.match(r"^[A-Z_]+=", words[0]):
                    words.pop(0)  # environment assignments before the command
                if words and words[0].rsplit("/", 1)[-1] == program:
                    found.append((path.name, words[1:]))
                words = []
    return found


def test_the_readme_is_a_front_page():
    readme = (REPO_ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 10 * 1024
    assert "make repro" in readme and "make test" in readme
    for page in PAGES:
        assert f"(docs/{page.name})" in readme or page.name == "index.md", f"map misses {page.name}"


def test_every_mnist_mlops_command_shown_parses():
    shown = commands_of("mnist-mlops")
    assert len(shown) >= 12
    names = set()
    for source, arguments in shown:
        try:
            parsed = parser().parse_args(arguments)
        except SystemExit:
            pytest.fail(f"{source}: mnist-mlops {' '.join(arguments)} does not parse")
        names.add(parsed.command)
    assert {"predict", "runs", "tune"} <= names


def test_every_make_target_shown_exists():
    makefile = (REPO_ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))
    shown = commands_of("make")
    assert len(shown) >= 10
    for source, arguments in shown:
        goals = [word for word in arguments if "=" not in word and not word.startswith("-")]
        assert set(goals) <= targets, f"{source}: make {' '.join(arguments)}"


def test_make_docs_serves_the_site_on_loopback():
    """`make docs` is `mkdocs serve` on 127.0.0.1 (DOCS_PORT, 8000 as in mkdocs.yml)."""
    config = (REPO_ROOT / "mkdocs.yml").read_text()
    assert re.search(r"^dev_addr: 127\.0\.0\.1:8000$", config, re.M)
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert re.search(r"^DOCS_PORT \?= 8000$", makefile, re.M)
    assert re.search(r"^\tmkdocs serve --dev-addr 127\.0\.0\.1:\$\(DOCS_PORT\)$", makefile, re.M)
    port = free_port()
    mkdocs = str(Path(sys.executable).parent / "mkdocs")
    command = [mkdocs, "serve", "--dev-addr", f"127.0.0.1:{port}", "--no-livereload"]
    env = subprocess_env(NO_MKDOCS_2_WARNING="1")
    with serving(command, env, f"http://127.0.0.1:{port}", "/", cwd=REPO_ROOT) as url:
        response = urllib.request.urlopen(f"{url}/architecture/", timeout=10)
        page, status = response.read().decode(), response.status
        response.close()
    assert status == 200
    assert "The journey of one served request" in page
    assert '<pre class="mermaid">' in page
