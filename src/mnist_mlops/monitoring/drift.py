"""The statistics of `mnist-mlops monitor`: served traffic against the model's reference profile.

Nine tests, each asking "could this traffic come from the reference's
distribution?":

- data drift: a two-sample Kolmogorov–Smirnov test per image feature (7);
- prediction drift: a chi-square test of the predicted-digit mix against the
  reference's proportions;
- confidence: a one-sided Kolmogorov–Smirnov test that the top
  probabilities are lower than the reference's.

A test fires when it is both significant and large. Significant: the
family-wise false-alarm rate is controlled by Bonferroni, each test at
alpha / 9, so on traffic from the reference's distribution the chance that
any of them fires is at most alpha (5 % by default), whatever the tests'
dependence. Large: its effect (the KS distance D, or the total variation
distance between the digit mixes) is at least `min_effect` (0.1). The floor
ignores differences too small to matter that significance alone would flag
in large windows: the MNIST test set's writers use slightly less ink than the
training set's (D about 0.06 in windows of 500), which Bonferroni alone
called drift in 14 % of windows of clean test digits; thick strokes and
noise move D to 0.9 and more. The realized accuracy on rows with ground
truth is reported with a Wilson 95 % interval, beside the test accuracy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from mnist_mlops.monitoring.features import FEATURES

OK, DRIFT, TOO_FEW = "ok", "drift", "too few rows"
NUM_CLASSES = 10


@dataclass(frozen=True)
class Test:
    name: str
    statistic: float
    p_value: float
    effect: float  # KS's D, or the total variation distance between the digit mixes
    reference: float  # the reference's mean (of the feature, the digit, the top probability)
    current: float

    def fired(self, threshold: float, min_effect: float) -> bool:
        return self.p_value < threshold and self.effect >= min_effect


@dataclass(frozen=True)
class Accuracy:
    value: float
    low: float
    high: float
    rows: int


@dataclass(frozen=True)
class Check:
    verdict: str
    rows: int
    alpha: float
    threshold: float
    min_effect: float
    tests: list[Test] = field(default_factory=list)
    accuracy: Accuracy | None = None

    @property
    def drifted(self) -> list[str]:
        return [test.name for test in self.tests if test.fired(self.threshold, self.min_effect)]

    def as_dict(self) -> dict:
        summary = asdict(self)
        summary["drifted"] = self.drifted
        return summary


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % for z = 1.96)."""
    if total == 0:
        return 0.0, 1.0
    share = correct / total
    denominator = 1 + z**2 / total
    centre = (share + z**2 / (2 * total)) / denominator
    half = z * math.sqrt(share * (1 - share) / total + z**2 / (4 * total**2)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def check(
    features: np.ndarray,
    digits: np.ndarray,
    top_probability: np.ndarray,
    reference: dict[str, np.ndarray],
    truth: np.ndarray | None = None,
    alpha: float = 0.05,
    min_rows: int = 200,
    min_effect: float = 0.1,
) -> Check:
    """Compare one window of traffic with the reference; `truth` is -1 where no digit came back."""
    from scipy import stats

    rows = len(digits)
    threshold = alpha / (len(FEATURES) + 2)
    accuracy = None
    if truth is not None and (labelled := truth >= 0).any():
        correct, total = int((digits[labelled] == truth[labelled]).sum()), int(labelled.sum())
        accuracy = Accuracy(correct / total, *wilson_interval(correct, total), total)
    if rows < min_rows:
        return Check(TOO_FEW, rows, alpha, threshold, min_effect, accuracy=accuracy)
    tests = []
    for index, name in enumerate(FEATURES):
        expected, observed = reference["features"][:, index], features[:, index]
        result = stats.ks_2samp(observed, expected, method="asymp")
        tests.append(_ks_test(name, result, expected, observed))
    counts = np.bincount(digits.astype(np.int64), minlength=NUM_CLASSES)
    # Half a count added to every digit keeps a digit the reference never
    # predicted from dividing by zero.
    expected = np.bincount(reference["digit"].astype(np.int64), minlength=NUM_CLASSES) + 0.5
    expected = expected / expected.sum()
    chi_square = stats.chisquare(counts, expected * rows)
    tests.append(
        Test(
            "predicted_digits",
            float(chi_square.statistic),
            float(chi_square.pvalue),
            float(np.abs(expected - counts / rows).sum() / 2),
            float(expected @ np.arange(NUM_CLASSES)),
            float(digits.mean()),
        )
    )
    # "greater": the traffic's distribution function lies above the
    # reference's, that is its top probabilities are lower.
    reference_top = reference["top_probability"]
    result = stats.ks_2samp(top_probability, reference_top, alternative="greater", method="asymp")
    tests.append(_ks_test("top_probability", result, reference_top, top_probability))
    fired = any(test.fired(threshold, min_effect) for test in tests)
    return Check(DRIFT if fired else OK, rows, alpha, threshold, min_effect, tests, accuracy)


def _ks_test(name: str, result, expected: np.ndarray, observed: np.ndarray) -> Test:
    statistic = float(result.statistic)
    return Test(
        name,
        statistic,
        float(result.pvalue),
        statistic,
        float(expected.mean()),
        float(observed.mean()),
    )
