"""The networks as a training process builds them: TensorFlow's oneDNN kernels on unless told."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ..conftest import subprocess_env

# A seeded fit of the seed's network, in a fresh process: which kernels, which weights.
FIT = """
import hashlib, json, os
import numpy as np
from mnist_mlops.model.architectures import Mlp, RMSprop, build_model, import_keras, set_random_seed
import_keras()
set_random_seed(7)
network = build_model(Mlp(), RMSprop())
random = np.random.default_rng(0)
images = random.integers(0, 256, (1024, 28, 28), dtype=np.uint8)
network.fit(images, random.integers(0, 10, 1024), batch_size=128, epochs=1, verbose=0)
weights = hashlib.sha256(b"".join(w.tobytes() for w in network.get_weights())).hexdigest()
print(json.dumps({"onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS"), "weights": weights}))
"""


def fits(*settings: dict[str, str]) -> list[dict]:
    """The FIT of one process per setting, run side by side."""
    processes = []
    for setting in settings:
        # As a user's shell starts it: the suite's own processes may have set it.
        env = {k: v for k, v in subprocess_env().items() if k != "TF_ENABLE_ONEDNN_OPTS"}
        env.update(setting)
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", FIT],
                cwd=Path.cwd(),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
        results.append(json.loads(stdout.splitlines()[-1]))
    return results


def test_the_seed_s_fit_uses_onednn_and_ends_with_the_same_weights_on_1_and_2_threads():
    """oneDNN's kernels (off by TensorFlow's default on AVX2 CPUs) unless the user says otherwise.

    The suite fits on 1 thread and a user on every core: with oneDNN, the
    seed's network ends with the same weights on both (not every shape does).
    """
    one, two, own = fits(
        {"TF_NUM_INTRAOP_THREADS": "1"},
        {"TF_NUM_INTRAOP_THREADS": "2"},
        {"TF_NUM_INTRAOP_THREADS": "2", "TF_ENABLE_ONEDNN_OPTS": "0"},
    )
    assert one["onednn"] == two["onednn"] == "1"
    assert one["weights"] == two["weights"]
    # The user's setting stands, and reaches TensorFlow: its own kernels round otherwise.
    assert own["onednn"] == "0"
    assert own["weights"] != one["weights"]


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_many_steps_a_call_train_the_same_weights_as_one(name):
    """STEPS_PER_EXECUTION changes how often Python runs, not what is computed."""
    from mnist_mlops.model.architectures import (
        MODELS,
        STEPS_PER_EXECUTION,
        Adam,
        build_model,
        import_keras,
        set_random_seed,
    )

    import_keras()
    model = MODELS[name]() if name == "mlp" else MODELS[name](filters=[4, 8], dense_units=16)
    random = np.random.default_rng(0)
    # 11 steps and a short one: fewer than a call's 32, so the last call runs short.
    images = random.integers(0, 256, (1400, 28, 28), dtype=np.uint8)
    labels = random.integers(0, 10, 1400)
    weights = {}
    for steps in (1, STEPS_PER_EXECUTION):
        set_random_seed(7)
        network = build_model(model, Adam(), steps_per_execution=steps)
        history = network.fit(images, labels, batch_size=128, epochs=2, verbose=0)
        weights[steps] = (network.get_weights(), history.history["loss"])
    (one, one_loss), (many, many_loss) = weights[1], weights[STEPS_PER_EXECUTION]
    assert STEPS_PER_EXECUTION > 1 and one_loss == many_loss
    assert all(np.array_equal(a, b) for a, b in zip(one, many, strict=True))
