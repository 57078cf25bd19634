"""The typed config schema, checked once at the edge.

`load_params()` reads `params.yaml` (what DVC composed from `conf/`) and
`validate()` turns any composed mapping into a `Config`, or raises one
`ConfigError` naming the key and the problem. Nothing here imports TensorFlow,
so a bad value stops the stage in well under a second.
"""

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mnist_mlops.model.architectures import MODELS, OPTIMIZERS
from mnist_mlops.paths import PARAMS_FILE

DATA_FORMATS = ("auto", "npz", "idx")
# What runs the served model: the ONNX export (no TensorFlow) or Keras itself.
SERVING_RUNTIMES = ("onnx", "keras")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ConfigError(ValueError):
    """A config value that the pipeline cannot run with."""


@dataclass(frozen=True)
class DataConfig:
    source: str
    sha256: dict[str, str] = field(default_factory=dict)
    format: str = "auto"
    sha256sums: Optional[str] = None  # noqa: UP045 (OmegaConf needs typing.Optional)
    content_sha256: Optional[str] = None  # noqa: UP045
    timeout_seconds: float = 30.0
    retries: int = 3
    train_examples: Optional[int] = None  # noqa: UP045
    test_examples: Optional[int] = None  # noqa: UP045

    def __post_init__(self) -> None:
        if self.format not in DATA_FORMATS:
            choices = ", ".join(DATA_FORMATS)
            raise ValueError(f"format must be one of {choices}, got {self.format!r}")
        for name, digest in self.sha256.items():
            if not _SHA256.match(digest):
                raise ValueError(f"sha256.{name} must be 64 lowercase hex digits, got {digest!r}")
        if self.content_sha256 is not None and not _SHA256.match(self.content_sha256):
            digest = self.content_sha256
            raise ValueError(
                f"content_sha256 must be 64 lowercase hex digits or null, got {digest!r}"
            )
        if self.timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds must be positive, got {self.timeout_seconds}")
        if self.retries < 0:
            raise ValueError(f"retries must be 0 or more, got {self.retries}")
        for name in ("train_examples", "test_examples"):
            count = getattr(self, name)
            if count is not None and count <= 0:
                raise ValueError(f"{name} must be positive or null, got {count}")


_ADDRESS = re.compile(r"^\[?[A-Za-z0-9.:_-]+\]?:\d{1,5}$")


@dataclass  # not frozen: OmegaConf cannot merge into a frozen dataclass nested in another
class DistributedConfig:
    """`train.distributed`: 1 process on TensorFlow (the default) or N data-parallel JAX ones."""

    processes: int = 1
    coordinator: str = "127.0.0.1:29400"
    timeout_seconds: int = 30

    def __post_init__(self) -> None:
        if self.processes <= 0:
            raise ValueError(f"distributed.processes must be positive, got {self.processes}")
        if not _ADDRESS.match(self.coordinator):
            raise ValueError(f"distributed.coordinator must be HOST:PORT, got {self.coordinator!r}")
        if self.timeout_seconds <= 0:
            raise ValueError(
                f"distributed.timeout_seconds must be positive, got {self.timeout_seconds}"
            )


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128
    validation_fraction: float = 0.1
    seed: int = 42
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(
                f"validation_fraction must be between 0 and 1, got {self.validation_fraction}"
            )
        if self.seed < 0:
            raise ValueError(f"seed must be 0 or more, got {self.seed}")
        if self.batch_size % self.distributed.processes:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of distributed.processes "
                f"({self.distributed.processes}): each process takes an equal share of a batch"
            )


@dataclass(frozen=True)
class MlflowConfig:
    experiment_name: str = "mnist"
    http_retries: int = 2
    http_timeout_seconds: int = 10
    system_metrics_interval_seconds: float = 1.0
    outage_seconds: float = 120

    def __post_init__(self) -> None:
        if not self.experiment_name.strip():
            raise ValueError("experiment_name must not be empty")
        if self.system_metrics_interval_seconds < 0:
            raise ValueError(
                "system_metrics_interval_seconds must be 0 (off) or more, "
                f"got {self.system_metrics_interval_seconds}"
            )
        if self.http_retries < 0:
            raise ValueError(f"http_retries must be 0 or more, got {self.http_retries}")
        if self.outage_seconds < 0:
            raise ValueError(f"outage_seconds must be 0 or more, got {self.outage_seconds}")
        if self.http_timeout_seconds <= 0:
            raise ValueError(
                f"http_timeout_seconds must be positive, got {self.http_timeout_seconds}"
            )


@dataclass(frozen=True)
class FeedbackConfig:
    """How the snapshot of served traffic with true digits (data/feedback) enters the pipeline."""

    recent_fraction: float = 0.2
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.recent_fraction <= 1:
            raise ValueError(f"recent_fraction must be in 0–1, got {self.recent_fraction}")
        if self.weight <= 0:
            raise ValueError(f"weight must be positive, got {self.weight}")


@dataclass(frozen=True)
class RegistryConfig:
    model_name: str = "mnist-classifier"
    promotion_margin: float = 0.0
    test_tolerance: float = 0.005
    robustness_tolerance: float = 0.1
    worst_class_floor: float = 0.9

    def __post_init__(self) -> None:
        if not self.model_name.strip():
            raise ValueError("model_name must not be empty")
        if self.promotion_margin < 0:
            raise ValueError(f"promotion_margin must be 0 or more, got {self.promotion_margin}")
        for name in ("test_tolerance", "robustness_tolerance", "worst_class_floor"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in 0–1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ServingConfig:
    max_batch_size: int = 1024
    runtime: str = "onnx"

    def __post_init__(self) -> None:
        if self.runtime not in SERVING_RUNTIMES:
            choices = ", ".join(SERVING_RUNTIMES)
            raise ValueError(f"runtime must be one of {choices}, got {self.runtime!r}")
        if self.max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be positive, got {self.max_batch_size}")


@dataclass(frozen=True)
class Config:
    """The whole validated config, plus the composed mapping it came from."""

    data: DataConfig
    train: TrainConfig
    mlflow: MlflowConfig
    registry: RegistryConfig
    serving: ServingConfig
    feedback: FeedbackConfig
    model: Any
    optimizer: Any
    raw: Mapping[str, Any]

    @property
    def model_name(self) -> str:
        return self.raw["model"]["name"]

    def flat_params(self) -> dict[str, Any]:
        """Every config value under its dotted key (`model.name`, `train.epochs`, …)."""
        return flatten(self.raw)


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def did_you_mean(unknown: list[str], known) -> str:
    """The closest known name to each unknown one ("did you mean …?"), then the known names."""
    matches = {
        name: match[0]
        for name in unknown
        if (match := difflib.get_close_matches(name, list(known), n=1, cutoff=0.6))
    }
    if len(unknown) == 1 and matches:
        hint = f"; did you mean {matches[unknown[0]]}?"
    else:
        pairs = [f"{name} → {match}" for name, match in matches.items()]
        hint = f"; did you mean {', '.join(pairs)}?" if pairs else ""
    return f"{hint} (known: {', '.join(sorted(known))})"


def _typed(section: str, schema: type, values: Any) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{section}: expected a mapping of settings, got {values!r}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), dict(values))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = f"{section}.{error.full_key}" if error.full_key else section
        message = str(error.msg).split("\n")[0]
        if "not in" in message and error.key is not None:  # an unknown key of the section
            owner = getattr(error, "object_type", None) or schema
            known = list(getattr(owner, "__dataclass_fields__", {}))
            message += did_you_mean([str(error.key)], known)
        raise ConfigError(f"{key}: {message}") from None
    except ValueError as error:
        raise ConfigError(f"{section}.{error}") from None


def _named(section: str, registry: Mapping[str, type], values: Any) -> Any:
    if not isinstance(values, Mapping) or "name" not in values:
        raise ConfigError(f"{section}.name is missing; choose one of {', '.join(sorted(registry))}")
    name = values["name"]
    if name not in registry:
        choices = ", ".join(sorted(registry))
        raise ConfigError(f"{section}.name: unknown {section} {name!r}; choose one of {choices}")
    settings = {key: value for key, value in values.items() if key != "name"}
    return _typed(section, registry[name], settings)


def validate(raw: Mapping[str, Any]) -> Config:
    """Check a composed config against the schema; raise ConfigError on the first problem."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"the config must be a mapping, got {type(raw).__name__}")
    expected = {"data", "train", "mlflow", "registry", "serving", "feedback", "model", "optimizer"}
    unknown = sorted(set(raw) - expected)
    if unknown:
        raise ConfigError(
            f"unknown config section(s): {', '.join(unknown)}{did_you_mean(unknown, expected)}"
        )
    missing = sorted(expected - set(raw))
    if missing:
        raise ConfigError(f"missing config section(s): {', '.join(missing)}")
    return Config(
        data=_typed("data", DataConfig, raw["data"]),
        train=_typed("train", TrainConfig, raw["train"]),
        mlflow=_typed("mlflow", MlflowConfig, raw["mlflow"]),
        registry=_typed("registry", RegistryConfig, raw["registry"]),
        serving=_typed("serving", ServingConfig, raw["serving"]),
        feedback=_typed("feedback", FeedbackConfig, raw["feedback"]),
        model=_named("model", MODELS, raw["model"]),
        optimizer=_named("optimizer", OPTIMIZERS, raw["optimizer"]),
        raw=raw,
    )


def load_params(path: Path = PARAMS_FILE) -> Config:
    """Read and validate the composed config that DVC wrote to params.yaml."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found; run from the project root") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    return validate(raw)
