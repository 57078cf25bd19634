"""The robustness suite: fixed, seeded perturbations of the test split."""

import numpy as np

from mnist_mlops.pipeline.robustness import PERTURBATIONS, perturbed, suite_accuracy, worst_class


def digits(count: int = 20) -> np.ndarray:
    """A vertical bar of ink, two pixels wide, in the middle of each image."""
    images = np.zeros((count, 28, 28), np.uint8)
    images[:, 6:22, 13:15] = 255
    return images


def test_every_perturbation_is_the_same_on_every_call_and_changes_the_images():
    images = digits()
    first, second = perturbed(images), perturbed(images.copy())
    assert tuple(first) == PERTURBATIONS
    for name in PERTURBATIONS:
        assert first[name].shape == images.shape and first[name].dtype == np.uint8
        assert np.array_equal(first[name], second[name]), name
        assert not np.array_equal(first[name], images), name
        assert first[name].min() >= 0 and first[name].max() <= 255, name
    ink = (images > 0).sum()
    assert (first["thick"] > 0).sum() > ink > (first["thin"] > 0).sum()
    assert first["faint"].max() == round(255 * 0.4)
    # Shifts keep the ink (a 3-pixel move never leaves the frame here), rotations turn it.
    assert (first["shift"] > 0).sum() == ink
    assert not np.array_equal(first["shift"], np.broadcast_to(first["shift"][0], images.shape))


def test_accuracies_and_the_worst_class_come_from_the_answers():
    images, labels = digits(10), np.arange(10) % 2
    always_zero = suite_accuracy(lambda batch: np.zeros(len(batch), int), perturbed(images), labels)
    assert always_zero == {name: 0.5 for name in PERTURBATIONS}
    predicted = np.array([0, 1, 0, 1, 0, 1, 0, 1, 1, 0])
    assert worst_class(labels, predicted) == (0, 0.8)
