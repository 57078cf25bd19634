"""The seed: Deep Learning with Python's first MNIST network as a plain Keras script.

The baseline for benchmarks/pipeline.py. It reads mnist.npz from the folder
given as its argument (the same mirror the pipeline fetches from) and prints
its timings as one JSON line.
"""

import json
import sys
import time

started = time.perf_counter()

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers  # noqa: E402

with np.load(f"{sys.argv[1]}/mnist.npz", allow_pickle=False) as mnist:
    train_images, train_labels = mnist["x_train"], mnist["y_train"]
    test_images, test_labels = mnist["x_test"], mnist["y_test"]

train_images = train_images.reshape((60000, 28 * 28)).astype("float32") / 255
test_images = test_images.reshape((10000, 28 * 28)).astype("float32") / 255

model = keras.Sequential(
    [layers.Dense(512, activation="relu"), layers.Dense(10, activation="softmax")]
)
model.compile(optimizer="rmsprop", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
fit_started = time.perf_counter()
model.fit(train_images, train_labels, epochs=5, batch_size=128, verbose=0)
fit_seconds = time.perf_counter() - fit_started
test_loss, test_accuracy = model.evaluate(test_images, test_labels, verbose=0)
print(
    json.dumps(
        {
            "test_accuracy": test_accuracy,
            "fit_seconds": fit_seconds,
            "total_seconds": time.perf_counter() - started,
        }
    )
)
