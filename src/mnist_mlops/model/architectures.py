"""Model and optimizer builders, chosen by name from the config.

Each entry is a small dataclass: its fields are the options a YAML file in
`conf/model/` or `conf/optimizer/` may set (the config schema), and its
`build()` makes the Keras object. Adding an architecture means one YAML file
and one class here, registered in MODELS.

Keras is imported inside the builders, so that reading and validating the
config never waits for TensorFlow.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras

IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
# Batch size for forward passes only (validation, evaluation): larger batches
# cost less per image and leave the numbers unchanged.
INFERENCE_BATCH_SIZE = 1000

# TensorFlow's native libraries log these on every start, before its own log
# level applies (absl logging is not initialised yet). Only these lines are
# dropped; any other native message, warning or error still reaches stderr.
_NATIVE_NOISE = re.compile(
    r"^(I\d{4} \S+ +\d+ \S+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|E\d{4} \S+ +\d+ cuda_platform\.cc:\d+\] failed call to cuInit)"
)


@contextmanager
def _without_native_noise() -> Iterator[None]:
    sys.stderr.flush()
    saved_stderr = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not _NATIVE_NOISE.match(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


def import_keras():
    """Import Keras with the start-up chatter kept out of the way.

    On TensorFlow, unless KERAS_BACKEND says otherwise (JAX for data-parallel
    training: pipeline/worker.py).
    """
    if "keras" in sys.modules:
        return sys.modules["keras"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow turns its oneDNN kernels on by itself only on CPUs with
    # AVX-512 VNNI or AMX. Elsewhere (AVX2) they halve the cnn_fast convnet's
    # CPU time, and a seeded fit of either preset ends with the same weights on
    # 1 thread and on 2 (docs/pipeline.md). TF_ENABLE_ONEDNN_OPTS=0 keeps
    # TensorFlow's own.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    on_tensorflow = os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow"
    with _without_native_noise(), _without(*UNUSED_OPTIONS, *(["jax"] if on_tensorflow else [])):
        import keras

        if on_tensorflow:
            import tensorflow as tf

            tf.config.list_physical_devices()
            logging.getLogger("tensorflow").addFilter(_not_about_retracing)
    return keras


def _not_about_retracing(record: logging.LogRecord) -> bool:
    """TensorFlow warns when 5 of the last 10 calls of its functions traced one.

    A study's worker builds a new network for every trial, each traced anew;
    with STEPS_PER_EXECUTION the warning came from the third network on, though
    a fit traces no more as it goes (50 epochs cost the same CPU either way).
    """
    return "triggered tf.function retracing" not in record.getMessage()


# What Keras loads wherever it is installed and a training process never uses:
# its scikit-learn wrappers (0.7 CPU-seconds) and its image gallery's pyplot (0.5).
UNUSED_OPTIONS = ("sklearn", "matplotlib")


@contextmanager
def _without(*optional: str) -> Iterator[None]:
    """Import TensorFlow and Keras without packages they load only as an option.

    TensorFlow's converters load JAX wherever it is installed (`make
    install-jax`: 0.7 CPU-seconds in every training process), Keras
    UNUSED_OPTIONS. None in sys.modules makes their import an ImportError,
    which they expect; each imports as usual afterwards.
    """
    kept_out = [name for name in optional if name not in sys.modules]
    for name in kept_out:
        sys.modules[name] = None
    try:
        yield
    finally:
        for name in kept_out:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


def set_random_seed(seed: int) -> None:
    """Keras's seeds: Python's, NumPy's and the backend's (TensorFlow's on TensorFlow).

    `keras.utils.set_random_seed` also seeds TensorFlow whenever it is
    installed, and so loads all of it (5 CPU-seconds) into a JAX process that
    never runs a TensorFlow op: on JAX the same seeds are set without it.
    """
    keras = import_keras()
    if keras.backend.backend() == "tensorflow":
        keras.utils.set_random_seed(seed)
        return
    import random

    import numpy as np
    from keras.src.backend.common import global_state
    from keras.src.random.seed_generator import GLOBAL_SEED_GENERATOR
    from keras.src.utils.rng_utils import GLOBAL_RANDOM_SEED

    global_state.set_global_attribute(GLOBAL_RANDOM_SEED, seed)
    global_state.set_global_attribute(GLOBAL_SEED_GENERATOR, None)
    random.seed(seed)
    np.random.seed(seed)


@dataclass(frozen=True)
class Mlp:
    """The seed's network: Dense(512, relu) then Dense(10, softmax)."""

    hidden_units: int = 512

    def __post_init__(self) -> None:
        if self.hidden_units <= 0:
            raise ValueError(f"hidden_units must be positive, got {self.hidden_units}")

    def build(self) -> keras.Model:
        keras = import_keras()
        layers = keras.layers
        inputs = keras.Input(shape=IMAGE_SHAPE, name="image")
        # The scaling lives in the model, so that serving feeds raw 0–255 pixels
        # exactly as training did.
        scaled = layers.Rescaling(1 / 255)(inputs)
        flat = layers.Flatten()(scaled)
        hidden = layers.Dense(self.hidden_units, activation="relu")(flat)
        outputs = layers.Dense(NUM_CLASSES, activation="softmax")(hidden)
        return keras.Model(inputs, outputs, name="mlp")


@dataclass(frozen=True)
class Cnn:
    """A small VGG-style convnet: blocks of 3×3 convolutions and max pooling, then a dense layer."""

    filters: list[int] = field(default_factory=lambda: [32, 64])
    convolutions_per_block: int = 2
    kernel_size: int = 3
    dense_units: int = 128
    dropout: float = 0.5

    def __post_init__(self) -> None:
        if not self.filters or any(count <= 0 for count in self.filters):
            raise ValueError(f"filters must be positive counts, got {list(self.filters)}")
        for name in ("convolutions_per_block", "kernel_size", "dense_units"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def build(self) -> keras.Model:
        keras = import_keras()
        layers = keras.layers
        inputs = keras.Input(shape=IMAGE_SHAPE, name="image")
        x = layers.Rescaling(1 / 255)(inputs)
        x = layers.Reshape((*IMAGE_SHAPE, 1))(x)
        for filter_count in self.filters:
            for _ in range(self.convolutions_per_block - 1):
                x = layers.Conv2D(
                    filter_count, self.kernel_size, padding="same", activation="relu"
                )(x)
            x = layers.Conv2D(filter_count, self.kernel_size, activation="relu")(x)
            x = layers.MaxPooling2D(pool_size=2)(x)
        x = layers.Flatten()(x)
        x = layers.Dropout(self.dropout)(x)
        x = layers.Dense(self.dense_units, activation="relu")(x)
        x = layers.Dropout(self.dropout)(x)
        outputs = layers.Dense(NUM_CLASSES, activation="softmax")(x)
        return keras.Model(inputs, outputs, name="cnn")


@dataclass(frozen=True)
class _Optimizer:
    learning_rate: float

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")


@dataclass(frozen=True)
class RMSprop(_Optimizer):
    learning_rate: float = 0.001

    def build(self) -> keras.optimizers.Optimizer:
        return import_keras().optimizers.RMSprop(learning_rate=self.learning_rate)


@dataclass(frozen=True)
class Adam(_Optimizer):
    learning_rate: float = 0.001

    def build(self) -> keras.optimizers.Optimizer:
        return import_keras().optimizers.Adam(learning_rate=self.learning_rate)


@dataclass(frozen=True)
class SGD(_Optimizer):
    learning_rate: float = 0.01
    momentum: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")

    def build(self) -> keras.optimizers.Optimizer:
        return import_keras().optimizers.SGD(
            learning_rate=self.learning_rate, momentum=self.momentum
        )


MODELS = {"mlp": Mlp, "cnn": Cnn}
OPTIMIZERS = {"rmsprop": RMSprop, "adam": Adam, "sgd": SGD}


# Training steps per call into the backend's compiled function. Python's share
# of a step of the mlp (Keras's loop, callbacks) is a sixth of its CPU time on one
# thread; 32 steps a call take the same steps in the same order, to the same
# weights, for 14 % (batch 128) to 22 % (batch 64) less. Callbacks see a batch
# end every 32 steps; the project's act at epoch ends only.
STEPS_PER_EXECUTION = 32


def build_model(
    model: Mlp | Cnn, optimizer: _Optimizer, steps_per_execution: int = STEPS_PER_EXECUTION
) -> keras.Model:
    """The compiled network: the seed's loss and metric with the chosen optimizer."""
    network = model.build()
    network.compile(
        optimizer=optimizer.build(),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    return network
