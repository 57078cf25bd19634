"""Search spaces for `mnist-mlops tune`: the Hydra group conf/search/, checked before any trial.

A search space mirrors the config it searches. A mapping with a
`distribution` key is searched; any other value is fixed for every trial:

    model:
      name: mlp                                  # fixed: the model group
      hidden_units: {distribution: int, low: 64, high: 1024, log: true}
    optimizer:
      name: {distribution: categorical, choices: [rmsprop, adam, sgd]}

`model.name` and `optimizer.name` choose config groups, as `model=cnn` does on
the command line, so a trial's config is composed by Hydra from conf/ exactly
as `dvc exp run -S` composes it. That is also what makes the best trial an
experiment preset (`export_preset`) that reproduces it.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mnist_mlops.atomic import write_text
from mnist_mlops.config import ConfigError, flatten, validate
from mnist_mlops.paths import CONFIG_DIR

GROUPS = ("model", "optimizer")  # config groups whose `name` a space may choose
DISTRIBUTIONS = {
    "int": {"low", "high", "log", "step"},
    "float": {"low", "high", "log"},
    "categorical": {"choices"},
}
PRESET_MARK = "exported by `mnist-mlops tune`"
_PLAIN = re.compile(r"^[A-Za-z0-9_.+-]+$")


class SearchError(ValueError):
    """A search space, or an override of it, that tune cannot run."""


@dataclass(frozen=True)
class Parameter:
    name: str  # the flattened config key, the same name the pipeline's runs log
    distribution: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial) -> Any:
        """Draw this parameter's value for an Optuna trial."""
        if self.distribution == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.distribution == "int":
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), log=self.log, step=self.step or 1
            )
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def endpoints(self) -> tuple[Any, ...]:
        return self.choices if self.distribution == "categorical" else (self.low, self.high)


@dataclass(frozen=True)
class SearchSpace:
    name: str
    parameters: tuple[Parameter, ...]
    fixed: Mapping[str, Any]  # flattened key -> value, the same in every trial
    overrides: tuple[str, ...]  # the user's Hydra overrides, applied to every trial
    config_dir: Path = CONFIG_DIR

    def describe(self) -> dict[str, Any]:
        """The space as plain data (logged to the study's parent run)."""
        searched = {
            parameter.name: {
                key: value
                for key, value in vars(parameter).items()
                if key != "name" and value not in (None, (), False)
            }
            for parameter in self.parameters
        }
        for values in searched.values():
            if "choices" in values:
                values["choices"] = list(values["choices"])
        return {"search": self.name, "searched": searched, "fixed": dict(self.fixed)}

    def trial_overrides(self, values: Mapping[str, Any]) -> list[str]:
        """Hydra overrides that give a trial's config: fixed values, then the drawn ones."""
        assignments = {**self.fixed, **values}
        return [*self.overrides, *(_override(key, value) for key, value in assignments.items())]

    def compose_trial(self, values: Mapping[str, Any]) -> dict[str, Any]:
        return compose(self.trial_overrides(values), self.config_dir)


def _override(key: str, value: Any) -> str:
    section, _, rest = key.partition(".")
    if section in GROUPS and rest == "name":
        return f"{section}={value}"
    if isinstance(value, str) and not _PLAIN.match(value):
        return f"{key}={json.dumps(value)}"
    if isinstance(value, (list, dict)):
        return f"{key}={json.dumps(value)}"
    return f"{key}={'null' if value is None else value}"


def compose(overrides: Sequence[str], config_dir: Path = CONFIG_DIR) -> dict[str, Any]:
    """Compose conf/ with Hydra overrides, as DVC does; Hydra's errors become one SearchError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base=None):
            composed = hydra_compose(config_name="config", overrides=list(overrides))
        return OmegaConf.to_container(composed, resolve=True)
    except (HydraException, OmegaConfBaseException) as error:
        raise SearchError(str(error).strip().splitlines()[0]) from None


def available(config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(path.stem for path in (config_dir / "search").glob("*.yaml"))


def load(name: str, overrides: Sequence[str] = (), config_dir: Path = CONFIG_DIR) -> SearchSpace:
    """Read conf/search/NAME.yaml (with `search.…` overrides) and check it against the config."""
    if name not in available(config_dir):
        choices = ", ".join(available(config_dir)) or "none"
        raise SearchError(f"no search space {name!r} in {config_dir / 'search'} (have: {choices})")
    config_overrides = tuple(item for item in overrides if not _searches(item))
    composed = compose([f"+search={name}", *overrides], config_dir)
    raw = composed.pop("search", None)
    if not isinstance(raw, Mapping) or not raw:
        raise SearchError(f"search {name}: expected a mapping of config sections")
    parameters, fixed = [], {}
    for key, value in _leaves(raw):
        if isinstance(value, Mapping) and "distribution" in value:
            parameters.append(_parameter(name, key, value))
        else:
            fixed[key] = value
    if not parameters:
        raise SearchError(f"search {name}: nothing to search (no key has a distribution)")
    space = SearchSpace(name, tuple(parameters), fixed, config_overrides, config_dir)
    _check_against_config(space, config_dir)
    return space


def _searches(override: str) -> bool:
    return override.lstrip("+~").startswith("search.")


def _leaves(mapping: Mapping[str, Any], prefix: str = ""):
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and "distribution" not in value:
            yield from _leaves(value, f"{dotted}.")
        else:
            yield dotted, value


def _parameter(search: str, key: str, spec: Mapping[str, Any]) -> Parameter:
    where = f"search {search}: {key}"
    distribution = spec["distribution"]
    if distribution not in DISTRIBUTIONS:
        choices = ", ".join(DISTRIBUTIONS)
        raise SearchError(f"{where}: unknown distribution {distribution!r} (use {choices})")
    fields = set(spec) - {"distribution"}
    unknown = sorted(fields - DISTRIBUTIONS[distribution])
    if unknown:
        raise SearchError(f"{where}: {distribution} takes no {', '.join(unknown)}")
    if distribution == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, Sequence) or isinstance(choices, str) or not choices:
            raise SearchError(f"{where}: choices must be a non-empty list")
        return Parameter(key, distribution, choices=tuple(choices))
    low, high = spec.get("low"), spec.get("high")
    number = int if distribution == "int" else (int, float)
    for label, bound in (("low", low), ("high", high)):
        if isinstance(bound, bool) or not isinstance(bound, number):
            raise SearchError(
                f"{where}: {label} must be a{'n' * (distribution == 'int')} "
                f"{distribution}, got {bound!r}"
            )
    if not low < high:
        raise SearchError(f"{where}: empty range, low ({low}) must be below high ({high})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SearchError(f"{where}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise SearchError(f"{where}: a log scale needs low above 0, got {low}")
    step = spec.get("step")
    if step is not None and (log or not isinstance(step, int) or step <= 0):
        raise SearchError(f"{where}: step must be a positive int, and cannot go with log")
    return Parameter(
        key,
        distribution,
        float(low) if distribution == "float" else low,
        float(high) if distribution == "float" else high,
        log,
        step,
    )


def _check_against_config(space: SearchSpace, config_dir: Path) -> None:
    """Every key must exist and every extreme value must pass the schema, in every group choice.

    Composing each combination of the searched groups with the lowest and the
    highest values of the rest turns a typo or an impossible bound into one
    line now, not a failed trial after TensorFlow has loaded.
    """
    group_keys = [f"{group}.name" for group in GROUPS]
    fixed_groups = {key: value for key, value in space.fixed.items() if key in group_keys}
    choices = {p.name: p.choices for p in space.parameters if p.name in group_keys}
    for key, options in {**{k: [v] for k, v in fixed_groups.items()}, **choices}.items():
        group = key.split(".")[0]
        for option in options:
            if not (config_dir / group / f"{option}.yaml").is_file():
                known = ", ".join(sorted(path.stem for path in (config_dir / group).glob("*.yaml")))
                raise SearchError(
                    f"search {space.name}: {key}: unknown {group} {option!r} ({known})"
                )
    others = [p for p in space.parameters if p.name not in group_keys]
    keys = [key for key in space.fixed if key not in group_keys] + [p.name for p in others]
    for combination in itertools.product(*choices.values()):
        groups = {**fixed_groups, **dict(zip(choices, combination, strict=True))}
        group_overrides = [_override(key, value) for key, value in groups.items()]
        known = flatten(compose([*space.overrides, *group_overrides], config_dir))
        for key in keys:
            if key not in known:
                chosen = ", ".join(f"{name}={value}" for name, value in groups.items())
                raise SearchError(f"search {space.name}: unknown parameter {key} ({chosen})")
        for end in (0, -1):
            values = {**groups, **{p.name: p.endpoints()[end] for p in others}}
            try:
                validate(space.compose_trial(values))
            except ConfigError as error:
                raise SearchError(f"search {space.name}: {error}") from None


def export_preset(space: SearchSpace, values: Mapping[str, Any], study: str, note: str) -> Path:
    """Write conf/experiment/STUDY.yaml: what the trial's config changes from the defaults.

    Returns its path. `dvc exp run -S experiment=STUDY` then runs exactly the
    trial's config through the whole pipeline; that is checked before writing.
    """
    config_dir = space.config_dir
    trial = space.compose_trial(values)
    default = compose([], config_dir)
    lines = [
        "# @package _global_",
        f"# {note}",
        f"# {PRESET_MARK}; run it with",
        (f"#   dvc exp run -S experiment={study}"),
    ]
    switched = [group for group in GROUPS if trial[group]["name"] != default[group]["name"]]
    if switched:
        lines.append("defaults:")
        lines += [f"  - override /{group}: {trial[group]['name']}" for group in switched]
    baseline = flatten(
        compose([f"{group}={trial[group]['name']}" for group in switched], config_dir)
    )
    changed: dict[str, Any] = {}
    for key, value in flatten(trial).items():
        if baseline.get(key, object()) != value:
            section = changed
            *parents, leaf = key.split(".")
            for parent in parents:
                section = section.setdefault(parent, {})
            section[leaf] = value
    if changed:
        lines.append(yaml.safe_dump(changed, sort_keys=False).rstrip())
    path = config_dir / "experiment" / f"{study}.yaml"
    if path.exists() and PRESET_MARK not in path.read_text():
        raise SearchError(f"{path} exists and was not exported by tune; remove or rename it")
    text = "\n".join(lines) + "\n"
    write_text(path, text)
    if flatten(compose([f"experiment={study}"], config_dir)) != flatten(trial):
        path.unlink()
        raise SearchError(f"the preset {path} does not reproduce the trial's config")
    return path
