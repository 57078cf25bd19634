"""The config: conf/ composes into params.yaml, every option builds, bad values stop early."""

import subprocess
import sys

import pytest
import yaml
from dvc.utils.hydra import compose_and_dump

from mnist_mlops.config import ConfigError, load_params, validate
from mnist_mlops.model.architectures import MODELS, OPTIMIZERS, build_model

from .conftest import REPO_ROOT, compose_config, subprocess_env


def test_params_yaml_is_what_conf_composes_to(tmp_path):
    composed = tmp_path / "params.yaml"
    compose_and_dump(composed, str(REPO_ROOT / "conf"), None, "config", str(REPO_ROOT), [])
    assert yaml.safe_load(composed.read_text()) == yaml.safe_load(
        (REPO_ROOT / "params.yaml").read_text()
    ), "params.yaml drifted from conf/: run `make params`"


def test_default_composition_is_the_seed():
    config = load_params(REPO_ROOT / "params.yaml")
    assert config.model_name == "mlp" and config.model.hidden_units == 512
    assert config.raw["optimizer"]["name"] == "rmsprop"
    assert (config.train.epochs, config.train.batch_size) == (5, 128)


def test_dvc_yaml_params_exist_in_params_yaml():
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for stage in stages.values():
        for dotted in stage.get("params", []):
            node = params
            for key in dotted.split("."):
                assert key in node, f"dvc.yaml names {dotted}, which params.yaml lacks"
                node = node[key]


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_every_group_option_composes_and_builds(model, optimizer):
    config = validate(compose_config(f"model={model}", f"optimizer={optimizer}"))
    network = build_model(config.model, config.optimizer)
    assert network.input_shape == (None, 28, 28)
    assert network.output_shape == (None, 10)
    assert network.optimizer.__class__.__name__.lower() == optimizer


PRESETS = sorted(path.stem for path in (REPO_ROOT / "conf" / "experiment").glob("*.yaml"))


def test_there_are_experiment_presets():
    assert {"cnn_fast", "mlp_seed"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_experiment_preset_composes_and_builds(preset):
    config = validate(compose_config(f"experiment={preset}"))
    network = build_model(config.model, config.optimizer)
    assert network.output_shape == (None, 10)
    # A preset holds only what differs from the defaults: nothing outside
    # the groups it overrides and the train settings changes.
    defaults = compose_config()
    for section in ("data", "mlflow", "registry", "serving"):
        assert config.raw[section] == defaults[section], section


def test_presets_select_what_they_promise():
    cnn_fast = validate(compose_config("experiment=cnn_fast"))
    assert (cnn_fast.model_name, cnn_fast.raw["optimizer"]["name"]) == ("cnn", "adam")
    assert cnn_fast.train.epochs == 10 and cnn_fast.model.filters == [16, 32]
    assert compose_config("experiment=mlp_seed") == compose_config()
    # Overrides on the command line still win over a preset.
    assert validate(compose_config("experiment=cnn_fast", "train.epochs=2")).train.epochs == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "model.name=transformer",
            "model.name: unknown model 'transformer'; choose one of cnn, mlp",
        ),
        ("train.epochs=0", "train.epochs must be positive, got 0"),
        ("train.epochs=-3", "train.epochs must be positive, got -3"),
        ("optimizer.learning_rate=-0.1", "optimizer.learning_rate must be positive"),
        ("train.batch_size=lots", "train.batch_size: Value 'lots' of type 'str' could not be"),
        ("+train.epoch=3", "train.epoch: Key 'epoch' not in 'TrainConfig'; did you mean epochs?"),
        ("+optimiser.name=adam", "unknown config section(s): optimiser; did you mean optimizer?"),
        ("train.validation_fraction=1.5", "validation_fraction must be between 0 and 1"),
        ("train.distributed.processes=0", "train.distributed.processes must be positive, got 0"),
        (
            "train.distributed.processes=3",
            "train.batch_size (128) must be a multiple of distributed.processes (3)",
        ),
        (
            "train.distributed.coordinator=somewhere",
            "train.distributed.coordinator must be HOST:PORT, got 'somewhere'",
        ),
        ("train.distributed.timeout_seconds=0", "distributed.timeout_seconds must be positive"),
        (
            "+train.distributed.hosts=4",
            "train.distributed.hosts: Key 'hosts' not in 'DistributedConfig' (known: coordinator,",
        ),
        ("data.format=zip", "data.format must be one of auto, npz, idx"),
        ("model.hidden_units=2.5", "model.hidden_units: Value '2.5' of type 'float'"),
    ],
)
def test_bad_values_give_one_clear_message(override, message):
    with pytest.raises(ConfigError) as error:
        validate(compose_config(override))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_stage_with_bad_params_stops_before_tensorflow_loads(tmp_path):
    raw = compose_config("train.epochs=0")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    probe = (
        "import sys\n"
        "from mnist_mlops.__main__ import main\n"
        "code = main(['train'])\n"
        "print('tensorflow' in sys.modules, code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split() == ["False", "2"]
    assert result.stderr.strip().splitlines() == [
        "mnist-mlops train: invalid config: train.epochs must be positive, got 0"
    ]


def test_missing_params_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="not found; run from the project root"):
        load_params(tmp_path / "params.yaml")
