"""Data-parallel training on the real MNIST: two processes reach the seed's accuracy."""

import json
import sys

import pytest
import yaml

from mnist_mlops.config import validate
from mnist_mlops.pipeline.evaluate import evaluate
from mnist_mlops.pipeline.fetch import fetch
from mnist_mlops.pipeline.preprocess import preprocess

from ..conftest import REAL_MNIST, compose_config, free_port, run
from .test_distributed import one_run, stage_env


@pytest.mark.slow
@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason=f"real MNIST mirror not found at {REAL_MNIST}")
def test_two_processes_on_real_mnist_reach_the_seed_accuracy(workdir):
    raw = compose_config(
        f"data.source={REAL_MNIST}",
        "data.sha256sums=SHA256SUMS",
        f"train.distributed.coordinator=127.0.0.1:{free_port()}",
    )
    config = validate(raw)
    fetch(config.data)
    preprocess(config)
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    command = [sys.executable, "-m", "mnist_mlops", "train", "--local-processes", "2"]
    result = run(command, workdir, stage_env(workdir))
    print(result.stdout)
    _client, logged = one_run(workdir)
    assert logged.data.tags["train.processes"] == "2"
    metrics = evaluate(config)
    print(json.dumps(metrics))
    assert metrics["test_accuracy"] >= 0.975
