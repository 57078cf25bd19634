"""Is params.yaml what conf/ composes? One line saying which keys differ, before a training run.

`dvc exp run -S …` and `dvc exp apply` write their parameters into
params.yaml; a later `make repro` or `mnist-mlops retrain` would train with
them, and the commit that follows would pair a `dvc.lock` of those values
with a `conf/` that says otherwise. `differences` composes `conf/` in memory
(exactly as DVC does, nothing written) and compares; `warn_if_different`
says so in one line and how to go back (`make params`). It never stops the run:
a user may mean it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from mnist_mlops.config import flatten
from mnist_mlops.paths import PARAMS_FILE

SHOWN = 5


def composed(conf_dir: Path = Path("conf")) -> dict:
    """What DVC's Hydra composition of `conf_dir` writes to params.yaml."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base=None):
        return OmegaConf.to_container(compose(config_name="config"), resolve=True)


def differences(params: Path = PARAMS_FILE, conf_dir: Path = Path("conf")) -> dict[str, tuple]:
    """{dotted key: (params.yaml's value, conf/'s value)} for every key where they differ."""
    written = flatten(yaml.safe_load(params.read_text()) or {})
    wanted = flatten(composed(conf_dir))
    missing = object()
    return {
        key: (written.get(key, missing), wanted.get(key, missing))
        for key in sorted(set(written) | set(wanted))
        if written.get(key, missing) != wanted.get(key, missing)
    }


def describe(different: dict[str, tuple]) -> str:
    def shown(value) -> str:
        return (
            "(none)" if not isinstance(value, (str, int, float, bool, type(None))) else str(value)
        )

    items = [
        f"{key} {shown(ours)} (conf/: {shown(theirs)})" for key, (ours, theirs) in different.items()
    ]
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def warn_if_different(command: str) -> None:
    """Print one line when params.yaml is not what conf/ composes; never raise."""
    if not PARAMS_FILE.exists() or not Path("conf").is_dir():
        return
    try:
        different = differences()
    except Exception as error:  # a broken conf/ is the stages' to report, in their words
        print(f"{command}: cannot compare params.yaml with conf/: {error}", file=sys.stderr)
        return
    if different:
        print(
            f"{command}: params.yaml differs from what conf/ composes: {describe(different)}; "
            "training with params.yaml as it is (`make params` goes back to conf/)",
            file=sys.stderr,
            flush=True,
        )


def main() -> int:
    """`python -m mnist_mlops.pipeline.params_check COMMAND`: the check, as `make repro` runs it."""
    warn_if_different(sys.argv[1] if len(sys.argv) > 1 else os.path.basename(sys.argv[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
