"""Figures of one site's results, drawn from its metrics dict (what metrics.json holds).

Every function writes one PNG and returns its path. Values that are unknown (None, or a key
that is missing) are left out of the figure instead of failing: a report must still be
written when, say, latency was not measured.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

# Headless sites have no display; Agg draws straight to PNG.
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)
import numpy as np  # noqa: E402

from outputs.atomic import save_with  # noqa: E402

SITE_COLOR = "#1f77b4"
FEDERATION_COLOR = "#ff7f0e"
FP32_COLOR = "#7f8c8d"
INT8_COLOR = "#27ae60"
DPI = 110


def plot_rounds(metrics: dict, path) -> Path:
    """Test accuracy and test loss of the global model per round, this site and federation-wide."""
    site_rounds = metrics.get("rounds") or []
    federation_rounds = (metrics.get("federation") or {}).get("rounds") or []
    figure, (accuracy_axis, loss_axis) = plt.subplots(1, 2, figsize=(10, 4))
    # Different line styles keep both curves visible where they coincide.
    curves = ((site_rounds, "this site", SITE_COLOR, "-"),
              (federation_rounds, "federation", FEDERATION_COLOR, "--"))
    for rounds, label, color, line_style in curves:
        round_numbers = [row["round"] for row in rounds]
        accuracy_percent = [_scaled(row.get("test_accuracy"), 100) for row in rounds]
        loss = [_scaled(row.get("test_loss"), 1) for row in rounds]
        style = dict(marker="o", color=color, linestyle=line_style, label=label)
        accuracy_axis.plot(round_numbers, accuracy_percent, **style)
        loss_axis.plot(round_numbers, loss, **style)
    _style_round_axis(accuracy_axis, "Test accuracy (%)")
    _style_round_axis(loss_axis, "Test loss")
    figure.suptitle("Global model after each round")
    return _save(figure, path)


def plot_fp32_vs_int8(metrics: dict, path) -> Path:
    """Side by side bars of this site's fp32 and int8 models: accuracy, file size, latency."""
    fp32 = metrics.get("fp32") or {}
    int8 = metrics.get("int8") or {}
    # (metrics key, panel title, scale to the unit shown, number format)
    panels = (("accuracy", "Test accuracy (%)", 100, ".2f"),
              ("size_bytes", "Model size (KB)", 1 / 1024, ".1f"),
              ("latency_ms", "Latency (ms)", 1, ".2f"))
    figure, axes = plt.subplots(1, len(panels), figsize=(11, 4))
    for axis, (key, title, scale, number_format) in zip(axes, panels):
        values = [_scaled(fp32.get(key), scale), _scaled(int8.get(key), scale)]
        _draw_pair(axis, values, title, number_format)
    figure.suptitle("fp32 model vs int8 model on this site's test set")
    return _save(figure, path)


def plot_confusion_matrix(matrix, labels, path) -> Path:
    """A heat map of a confusion matrix (rows: true class, columns: predicted class)."""
    matrix = np.asarray(matrix)
    size = max(4.0, 0.5 * len(labels) + 2.5)
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    ticks = range(len(labels))
    axis.set_xticks(ticks, [str(label) for label in labels])
    axis.set_yticks(ticks, [str(label) for label in labels])
    axis.set_xlabel("Predicted class")
    axis.set_ylabel("True class")
    # Dark text on light cells and light text on dark cells keeps every count readable.
    threshold = matrix.max() / 2 if matrix.size else 0
    for row, column in np.ndindex(matrix.shape):
        count = matrix[row, column]
        axis.text(column, row, str(count), ha="center", va="center", fontsize=8,
                  color="white" if count > threshold else "black")
    axis.set_title("Confusion matrix of the int8 model")
    return _save(figure, path)


def _draw_pair(axis, values, title, number_format):
    names = ("fp32", "int8")
    heights = [0 if math.isnan(value) else value for value in values]
    bars = axis.bar(names, heights, color=(FP32_COLOR, INT8_COLOR))
    for bar, value in zip(bars, values):
        text = "n/a" if math.isnan(value) else format(value, number_format)
        axis.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      ha="center", va="bottom", fontsize=9)
    axis.set_title(title)
    axis.margins(y=0.15)


def _style_round_axis(axis, label):
    axis.set_xlabel("Round")
    axis.set_ylabel(label)
    axis.grid(alpha=0.3)
    axis.legend()
    # Rounds are whole numbers; fractional ticks would suggest otherwise.
    axis.xaxis.get_major_locator().set_params(integer=True)


def _scaled(value, scale):
    """value * scale, or NaN when unknown (matplotlib leaves NaN points out of a line)."""
    return float("nan") if value is None else float(value) * scale


def _save(figure, path) -> Path:
    path = Path(path)
    try:
        figure.tight_layout()
        # Drawn into memory, then written whole or not at all (outputs/atomic.py).
        return save_with(path, lambda handle: figure.savefig(handle, format="png", dpi=DPI))
    finally:
        plt.close(figure)
