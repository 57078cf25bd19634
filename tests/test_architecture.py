"""The house's shape: wings import one way, nothing imports in a circle, rooms stay small,
and the command line is a table of contents whose every command shows its defaults."""

import argparse
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import mnist_mlops
from mnist_mlops.__main__ import parser

from .conftest import REPO_ROOT

PACKAGE = Path(mnist_mlops.__file__).parent
BENCHMARKS = REPO_ROOT / "benchmarks"
MAX_MODULE_LINES = 300


def module_name(path: Path) -> str:
    root = PACKAGE.parent if path.is_relative_to(PACKAGE) else REPO_ROOT
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """Every module of the project's package, its benchmarks or its tests that `path`
    imports, at the top or inside a function."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module)
            # `from mnist_mlops.tuning import search` imports the module search.
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {
        name for name in imported if name.split(".")[0] in ("mnist_mlops", "benchmarks", "tests")
    }


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
BENCHMARK_MODULES = {module_name(path): path for path in sorted(BENCHMARKS.glob("*.py"))}
GRAPH = {
    name: {imported for imported in project_imports(path) if imported in MODULES} - {name}
    for name, path in MODULES.items()
}
# The package and the benchmarks together: a benchmark may import the package, never the
# other way round.
WHOLE_GRAPH = {
    name: {
        imported
        for imported in project_imports(path)
        if imported in MODULES or imported in BENCHMARK_MODULES
    }
    - {name}
    for name, path in {**MODULES, **BENCHMARK_MODULES}.items()
}


def unit(module: str) -> str:
    """The wing or ground module a module belongs to: mnist_mlops.tracking.ui -> tracking."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer(module: str) -> int:
    for index, units in enumerate(mnist_mlops.LAYERS):
        if unit(module) in units:
            return index
    raise AssertionError(f"{module} is in no layer of mnist_mlops.LAYERS: give it one")


def test_every_module_has_a_layer_and_every_wing_says_what_it_holds():
    for module in MODULES:
        if module != "mnist_mlops":
            layer(module)
    for units in mnist_mlops.LAYERS:
        for name in units:
            wing = PACKAGE / name
            if wing.is_dir():
                docstring = ast.get_docstring(ast.parse((wing / "__init__.py").read_text()))
                assert docstring and "import" in docstring.lower(), (
                    f"{name}/__init__.py: say what it may import"
                )


def test_wings_import_one_way():
    wrong = [
        f"{module} imports {imported}"
        for module, imports in GRAPH.items()
        for imported in imports
        if module != "mnist_mlops"
        and imported != "mnist_mlops"
        and unit(imported) != unit(module)
        and layer(imported) >= layer(module)
    ]
    assert not wrong, "imports against mnist_mlops.LAYERS:\n" + "\n".join(wrong)


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph` as the list of its modules, or [] when there is none."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str]:
        state[module], path[len(path) :] = "open", [module]
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                return [*path[path.index(imported) :], imported]
            if imported not in state and (cycle := visit(imported)):
                return cycle
        state[module] = "done"
        path.pop()
        return []

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return []


def test_no_import_cycle_anywhere():
    assert find_cycle(WHOLE_GRAPH) == []


def test_benchmarks_share_one_module_and_reach_no_test():
    assert "benchmarks.common" in BENCHMARK_MODULES
    for name, path in BENCHMARK_MODULES.items():
        imported = project_imports(path)
        assert not {module for module in imported if module.split(".")[0] == "tests"}, (
            f"{name} imports the tests"
        )
        others = {
            module
            for module in imported
            if module in BENCHMARK_MODULES and module not in ("benchmarks", "benchmarks.common")
        }
        # One benchmark may call another's part (serving --proxy runs proxy_cost), one way.
        assert all(name not in WHOLE_GRAPH[other] for other in others), name
    for module, path in MODULES.items():
        assert not {
            name for name in project_imports(path) if name.split(".")[0] != "mnist_mlops"
        }, f"{module} imports outside the package"


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]


def test_no_module_passes_its_size():
    long = {
        module: lines
        for module, path in {**MODULES, **BENCHMARK_MODULES}.items()
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"split by what they do: {long}"


def test_dvc_yaml_leads_from_each_stage_to_its_module():
    stages = __import__("yaml").safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    for stage, definition in stages.items():
        assert definition["cmd"] == f"python -m mnist_mlops {stage}"
        assert f"src/mnist_mlops/pipeline/{stage}.py" in definition["deps"]
        for dependency in definition["deps"]:
            assert (
                (REPO_ROOT / dependency).exists()
                or dependency.startswith("data/")
                or (dependency == "models")
            ), f"{stage} depends on {dependency}, which is not there"


def commands(command: argparse.ArgumentParser | None = None, prefix: str = "") -> dict:
    """Every command that runs something, by its words (`train`, `feedback snapshot`)."""
    subparsers = next(
        action
        for action in (command or parser())._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    found = {}
    for name, sub in subparsers.choices.items():
        nested = any(isinstance(action, argparse._SubParsersAction) for action in sub._actions)
        found.update(commands(sub, f"{prefix}{name} ") if nested else {f"{prefix}{name}": sub})
    return found


def test_the_command_line_is_assembled_from_the_wings():
    wings = {}
    for name, command in commands().items():
        run = command.get_default("run")
        assert run is not None, f"{name} sets no run"
        wings[name] = run.__module__
    assert wings["train"] == "mnist_mlops.pipeline.commands"
    assert wings["runs"] == wings["ui"] == "mnist_mlops.tracking.commands"
    assert wings["serve"] == wings["predict"] == "mnist_mlops.serving.commands"
    assert wings["tune"] == "mnist_mlops.tuning.commands"
    assert (
        wings["feedback record"] == wings["feedback snapshot"] == "mnist_mlops.monitoring.commands"
    )
    assert wings["tracking-server"] == "mnist_mlops.team.commands"
    main_source = (PACKAGE / "__main__.py").read_text()
    assert "add_argument" not in main_source


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_help_shows_its_defaults(name):
    command = commands()[name]
    # Compared without whitespace: help text wraps long defaults at their hyphens.
    shown = "".join(command.format_help().split())
    for action in command._actions:
        if action.default in (None, False, argparse.SUPPRESS) or action.help == argparse.SUPPRESS:
            continue
        if not action.option_strings and action.nargs not in ("?", "*"):
            continue
        assert "(" + "".join(str(action.default).split()) in shown, (
            f"{name} {action.dest}: default not in --help"
        )


def test_secrets_from_the_environment_stay_out_of_help(tmp_path):
    secret = "postgresql://mlflow:s3cret@127.0.0.1:5432/mlflow"
    environment = {
        "MNIST_TEAM_BACKEND_STORE_URI": secret,
        "MNIST_TEAM_POSTGRES_ADMIN_URI": secret,
        "MNIST_OPTUNA_STORAGE": secret,
        "PATH": "/usr/bin:/bin",
    }
    for name, variable in (
        ("tracking-server", "MNIST_TEAM_BACKEND_STORE_URI"),
        ("tune", "MNIST_OPTUNA_STORAGE"),
    ):
        shown = subprocess.run(
            [sys.executable, "-m", "mnist_mlops", name, "--help"],
            capture_output=True,
            text=True,
            check=True,
            env=environment,
            cwd=tmp_path,
        ).stdout
        assert variable in shown
        assert "s3cret" not in shown
