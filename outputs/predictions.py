"""Test-set labels and predictions as CSV files that FeatureCloud's evaluation app reads.

What the evaluation app expects (read in FeatureCloud/fc-clf-evaluation, files `states.py`,
`algo.py`, `README.md` and `test/client1/*`):
- Its config.yml section `fc_classification_evaluation` names the two files under
  `input: {y_true: ..., y_pred: ...}`; its own test clients use `y_test.csv` and `y_pred.csv`.
- A file ending in `.csv` is read with `pandas.read_csv(path, sep=",")`: always a comma
  (the configured `format.sep` is not used for .csv), the first line is a header, and no
  index column is expected (every column is taken as data and flattened).
- Its sample files hold one column with the header `y_true` (labels) and `y_pred`
  (predictions), one integer per line.
- Caveat: the app scores a binary problem (positive label 1, prediction > 0.5). For more than
  two classes its figures are those of "class 1 vs. the rest"; report.html shows the full
  confusion matrix.

So this module writes `y_test.csv` (header `y_true`) and `y_pred.csv` (header `y_pred`, the
int8 model, the model every site takes home), plus `y_pred_fp32.csv` (header `y_pred`, the
fp32 model): pointing the evaluation app's `y_pred` at it evaluates the fp32 model instead.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from outputs.atomic import write_text

LABELS_FILE = "y_test.csv"
INT8_PREDICTIONS_FILE = "y_pred.csv"
FP32_PREDICTIONS_FILE = "y_pred_fp32.csv"
LABELS_HEADER = "y_true"
PREDICTIONS_HEADER = "y_pred"


def write_predictions(output_dir, y_true, y_pred_int8, y_pred_fp32) -> list[Path]:
    """Write y_test.csv, y_pred.csv (int8) and y_pred_fp32.csv; return their paths in that order.

    The three inputs are class indices in test-set order (lists, numpy arrays or CPU tensors).
    """
    columns = {
        "y_true": _as_class_indices("y_true", y_true),
        "y_pred_int8": _as_class_indices("y_pred_int8", y_pred_int8),
        "y_pred_fp32": _as_class_indices("y_pred_fp32", y_pred_fp32),
    }
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"write_predictions: y_true, y_pred_int8 and y_pred_fp32 must have "
                         f"the same length, got {lengths}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    files = ((LABELS_FILE, LABELS_HEADER, columns["y_true"]),
             (INT8_PREDICTIONS_FILE, PREDICTIONS_HEADER, columns["y_pred_int8"]),
             (FP32_PREDICTIONS_FILE, PREDICTIONS_HEADER, columns["y_pred_fp32"]))
    return [_write_column(output_dir / name, header, values) for name, header, values in files]


def _as_class_indices(name, values) -> list[int]:
    array = np.asarray(values).ravel()
    integral_floats = array.dtype.kind == "f" and bool(np.all(np.mod(array, 1) == 0))
    if array.size and array.dtype.kind not in "iu" and not integral_floats:
        raise ValueError(f"write_predictions: {name} must hold class indices (integers), "
                         f"got dtype {array.dtype}")
    return [int(value) for value in array]


def _write_column(path: Path, header: str, values: list[int]) -> Path:
    lines = [header, *(str(value) for value in values)]
    return write_text(path, "\n".join(lines) + "\n")
