"""What one check of the monitor leaves behind: a JSON summary, a PNG of the features, an HTML page.

The page is the project's own, small and self-contained (the figure is
inlined), rather than Evidently's: Evidently 0.7.23 does not import beside
the locked pandas 3.1.1 (it does with 3.0.6), and holding the whole stack's
pandas back, with Evidently's own dependencies added, would buy a report
that these nine tests and one figure already give.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from mnist_mlops.atomic import atomic_directory
from mnist_mlops.monitoring.calibration import estimate_words
from mnist_mlops.monitoring.drift import Check
from mnist_mlops.monitoring.features import FEATURES

SUMMARY, FIGURE, PAGE = "summary.json", "features.png", "report.html"
REPORT_FILES = (SUMMARY, FIGURE, PAGE)


def figure(features: np.ndarray, top: np.ndarray, reference: dict[str, np.ndarray]) -> bytes:
    """Histograms of each feature and of the top probability, reference against traffic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*FEATURES, "top_probability"]
    current = np.column_stack([features, top])
    expected = np.column_stack([reference["features"], reference["top_probability"]])
    fig, axes = plt.subplots(2, 4, figsize=(14, 6))
    for axis, name, index in zip(axes.flat, names, range(len(names)), strict=True):
        low = min(current[:, index].min(), expected[:, index].min())
        high = max(current[:, index].max(), expected[:, index].max())
        bins = np.linspace(low, high if high > low else low + 1, 30)
        axis.hist(expected[:, index], bins=bins, density=True, alpha=0.5, label="reference")
        axis.hist(current[:, index], bins=bins, density=True, alpha=0.5, label="traffic")
        axis.set_title(name)
    axes.flat[0].legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


def page(summary: dict, png: bytes) -> str:
    rows = "".join(
        f"<tr{' class=fired' if test['name'] in summary['drifted'] else ''}>"
        f"<td>{html.escape(test['name'])}</td><td>{test['statistic']:.4g}</td>"
        f"<td>{test['p_value']:.3g}</td><td>{test['effect']:.3f}</td><td>{test['reference']:.4g}</td>"
        f"<td>{test['current']:.4g}</td></tr>"
        for test in summary["tests"]
    )
    accuracy = summary["accuracy"]
    realized = (
        f"{accuracy['value']:.4f} (95 % interval {accuracy['low']:.4f}–{accuracy['high']:.4f}, "
        f"{accuracy['rows']} rows with true digits)"
        if accuracy
        else "no true digits yet"
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8">
<title>mnist-mlops monitor: {html.escape(summary["verdict"])}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:.2em .8em;text-align:right}}
.fired{{background:#fdd}}</style></head><body>
<h1>Model {html.escape(summary["model_name"])} v{html.escape(summary["model_version"])}:
{html.escape(summary["verdict"])}</h1>
<p>{summary["rows"]} rows from {html.escape(summary["window"]["first"])} to
{html.escape(summary["window"]["last"])}; each test at alpha {summary["alpha"]} / 9 =
{summary["threshold"]:.4g} (Bonferroni).</p>
<p>Realized accuracy: {realized}; test accuracy {summary["test_accuracy"]}.</p>
{_health(summary.get("estimated"))}
<table><tr><th>test</th><th>statistic</th><th>p-value</th><th>effect</th><th>reference mean</th>
<th>traffic mean</th></tr>
{rows}</table>
<img alt="features, reference against traffic"
 src="data:image/png;base64,{base64.b64encode(png).decode()}">
</body></html>
"""


def _health(estimated: dict | None) -> str:
    """The estimated accuracy (calibration.py) and the per-digit table."""
    if not estimated:
        return ""
    number = lambda value: "-" if value is None else f"{value:.3f}"  # noqa: E731
    rows = "".join(
        f"<tr><td>{item['digit']}</td><td>{number(item['share'])}</td>"
        f"<td>{number(item['reference_share'])}</td><td>{number(item['mean_confidence'])}</td>"
        f"<td>{number(item['estimated_accuracy'])}</td><td>{number(item['realized_accuracy'])}"
        f" ({item['labelled_rows']})</td></tr>"
        for item in estimated["per_digit"]
    )
    return (
        f"<p>{html.escape(estimate_words(estimated))}: the mean calibrated top probability "
        f"(temperature {estimated['temperature']:.3f}).</p><table><tr><th>predicted digit</th>"
        "<th>share</th><th>reference share</th><th>mean confidence</th>"
        f"<th>estimated accuracy</th><th>realized accuracy (rows)</th></tr>{rows}</table>"
    )


def foreign_files(directory: Path) -> list[str]:
    """What a folder holds besides a report: the report replaces its folder whole."""
    if not directory.is_dir():
        return []
    return sorted(path.name for path in directory.iterdir() if path.name not in REPORT_FILES)


def write_reports(directory: Path, check: Check, context: dict, png: bytes | None) -> dict:
    """Write the summary, the figure and the page into `directory` at once; return the summary."""
    summary = {**context, **check.as_dict()}
    with atomic_directory(directory) as staging:
        (staging / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        if png is not None:
            (staging / FIGURE).write_bytes(png)
            (staging / PAGE).write_text(page(summary, png))
    return summary
