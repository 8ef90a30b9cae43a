"""report.html, its figures and the prediction CSVs: written, correct, and rendered by a browser."""
import base64
import csv
import re
import shutil
import subprocess
from html.parser import HTMLParser

import matplotlib.image
import numpy as np
import pytest
import torch
from PIL import Image

from outputs.predictions import write_predictions
from outputs.report import confusion_matrix, write_report

# 3 classes; counted by hand: row = true class, column = predicted class
Y_TRUE = [0, 0, 0, 1, 1, 2, 2, 2, 2]
Y_PRED = [0, 0, 1, 1, 1, 2, 0, 2, 2]
EXPECTED_MATRIX = [[2, 1, 0],
                   [0, 2, 0],
                   [1, 0, 3]]
CONFIG_TEXT = "fc_quantized_cnn:\n  model: model.py  # <b>not bold</b> & co\n  max_iter: 3\n"


def round_row(number, test_loss, test_accuracy, validation_loss=None, validation_accuracy=None):
    return {"round": number, "train_loss": 1.0 / number, "train_accuracy": 0.7 + 0.05 * number,
            "test_loss": test_loss, "test_accuracy": test_accuracy,
            "validation_loss": validation_loss, "validation_accuracy": validation_accuracy}


@pytest.fixture
def metrics():
    return {
        "site": {"id": "a1b2c3d4e5f60718", "coordinator": True},
        "backend": "x86", "quant_type": "post_static", "quantization_mode": "fx",
        "n_train": 1333, "n_test": 9,
        "rounds": [round_row(1, 0.61, 0.81), round_row(2, None, None), round_row(3, 0.35, 0.9)],
        "fp32": {"accuracy": 0.955, "loss": 0.15, "size_bytes": 181000, "latency_ms": 3.1},
        "int8": {"accuracy": 0.952, "loss": 0.16, "size_bytes": 52000, "latency_ms": 1.2},
        "federation": {
            "n_sites": 3, "n_train": 4000, "n_test": 1000,
            "rounds": [round_row(1, 0.55, 0.83, 0.52, 0.84), round_row(2, 0.41, 0.88),
                       round_row(3, 0.30, 0.93)],
            "fp32": {"accuracy": 0.953, "loss": 0.15}, "int8": {"accuracy": 0.951, "loss": 0.16},
        },
        "config": {"max_iter": 3},
    }


@pytest.fixture
def report(tmp_path, metrics):
    return write_report(tmp_path, metrics, Y_TRUE, Y_PRED, CONFIG_TEXT)


class _TableReader(HTMLParser):
    """Collects the text of every cell of every table that has an id, and the <pre> text."""

    def __init__(self):
        super().__init__()
        self.tables, self.pre_text, self.image_sources = {}, "", []
        self._table, self._cell, self._in_pre = None, None, False

    def handle_starttag(self, tag, attributes):
        attributes = dict(attributes)
        if tag == "table" and "id" in attributes:
            self._table = self.tables.setdefault(attributes["id"], [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = ""
        elif tag == "pre":
            self._in_pre = True
        elif tag == "img":
            self.image_sources.append(attributes.get("src", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1].append(self._cell.strip())
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "pre":
            self._in_pre = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._in_pre:
            self.pre_text += data


def read_html(path):
    reader = _TableReader()
    reader.feed(path.read_text(encoding="utf-8"))
    return reader


def rows_by_label(table):
    return {row[0]: row[1:] for row in table[1:]}


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    labels, counts = confusion_matrix(Y_TRUE, Y_PRED)
    assert labels == [0, 1, 2]
    assert counts.tolist() == EXPECTED_MATRIX


def test_confusion_matrix_matches_an_independent_count_on_random_labels():
    generator = np.random.default_rng(7)
    y_true = generator.integers(0, 10, 500)
    y_pred = np.where(generator.random(500) < 0.8, y_true, generator.integers(0, 10, 500))
    expected = np.zeros((10, 10), dtype=int)
    np.add.at(expected, (y_true, y_pred), 1)
    labels, counts = confusion_matrix(torch.from_numpy(y_true), y_pred)
    assert labels == list(range(10))
    assert np.array_equal(counts, expected)


def test_report_and_figures_are_written_as_valid_images(report):
    assert report.name == "report.html"
    for name in ("rounds.png", "fp32_vs_int8.png", "confusion_matrix.png"):
        image = matplotlib.image.imread(report.parent / name)
        height, width = image.shape[:2]
        assert height >= 300 and width >= 300, name
        assert image.std() > 0.05, f"{name} looks blank"


def test_comparison_tables_show_the_metrics_with_their_ratios(report):
    tables = read_html(report).tables
    site = rows_by_label(tables["site-fp32-int8"])
    assert site["Accuracy"] == ["95.50 %", "95.20 %", "-0.30 pp"]
    assert site["Loss"] == ["0.1500", "0.1600", "+0.0100"]
    assert site["Size"] == [f"{181000 / 1024:.1f} KB", f"{52000 / 1024:.1f} KB", "3.5x smaller"]
    assert site["Latency"] == ["3.10 ms", "1.20 ms", "2.6x faster"]
    federation = rows_by_label(tables["federation-fp32-int8"])
    # the federation reports no size or latency: those rows are left out, not shown empty
    assert federation == {"Accuracy": ["95.30 %", "95.10 %", "-0.20 pp"],
                          "Loss": ["0.1500", "0.1600", "+0.0100"]}


def test_rounds_table_lists_site_and_federation_per_round(report, metrics):
    table = read_html(report).tables["rounds"]
    data_rows = [row for row in table if row and row[0].isdigit()]
    assert [row[0] for row in data_rows] == ["1", "2", "3"]
    round_one = data_rows[0]
    # Round | site: train loss, train acc, test loss, test acc, val. loss, val. acc | federation: the same six
    assert round_one[1:] == ["1.0000", "75.00 %", "0.6100", "81.00 %", "n/a", "n/a",
                             "1.0000", "75.00 %", "0.5500", "83.00 %", "0.5200", "84.00 %"]
    assert data_rows[1][3:5] == ["n/a", "n/a"], "unknown test metrics must read n/a"
    assert data_rows[2][9:11] == ["0.3000", "93.00 %"]


def test_confusion_table_holds_the_counts(report):
    table = read_html(report).tables["confusion-matrix"]
    assert table[0][1:] == ["0", "1", "2"]
    assert [[int(cell) for cell in row[1:]] for row in table[1:]] == EXPECTED_MATRIX
    text = report.read_text(encoding="utf-8")
    assert "7 of 9" in text  # correct predictions: the diagonal's sum


def test_config_is_shown_escaped(report):
    html_reader = read_html(report)
    assert html_reader.pre_text == CONFIG_TEXT
    assert "<b>not bold</b>" not in report.read_text(encoding="utf-8")


def test_page_is_self_contained_with_embedded_figures(report):
    text = report.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:|//)""", text)
    assert "<link" not in text and "<script" not in text
    sources = read_html(report).image_sources
    prefix = "data:image/png;base64,"
    assert len(sources) == 2 and all(source.startswith(prefix) for source in sources)
    embedded = {base64.b64decode(source[len(prefix):]) for source in sources}
    written = {(report.parent / name).read_bytes() for name in ("rounds.png", "fp32_vs_int8.png")}
    assert embedded == written


def test_report_survives_missing_figures(tmp_path, metrics):
    del metrics["federation"]
    metrics["int8"]["latency_ms"] = None
    report = write_report(tmp_path, metrics, Y_TRUE, Y_PRED, "")
    site = rows_by_label(read_html(report).tables["site-fp32-int8"])
    assert site["Latency"] == ["3.10 ms", "n/a", "n/a"]
    assert read_html(report).tables["federation-fp32-int8"] == [
        ["Metric", "fp32", "int8", "int8 vs fp32"]]


# ---- it renders ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def chromium():
    path = shutil.which("chromium")
    assert path, "chromium is needed to render the report: run tools/setup_system.sh (make test does)"
    return path


def test_headless_chromium_renders_the_report(chromium, report, tmp_path):
    screenshot = tmp_path / "screenshot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                    f"--user-data-dir={tmp_path / 'chromium-profile'}",
                    f"--screenshot={screenshot}", "--window-size=1200,2000",
                    report.as_uri()], capture_output=True, timeout=60)
    assert screenshot.exists(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(screenshot).convert("RGB")).reshape(-1, 3)
    colors, counts = np.unique(pixels, axis=0, return_counts=True)
    assert len(colors) > 200, "the page rendered with almost no distinct colors"
    assert counts.max() / len(pixels) < 0.95, "the page is nearly one flat color"


# ---- predictions ---------------------------------------------------------------------------

def read_csv_like_the_evaluation_app(path):
    """Comma separated, first line the header, no index column: (header, integer values)."""
    with path.open(newline="") as handle:
        header, *rows = list(csv.reader(handle, delimiter=","))
    assert all(len(row) == 1 for row in rows), f"{path.name} must hold a single column"
    return header, [int(row[0]) for row in rows]


def test_predictions_round_trip_in_the_evaluation_apps_format(tmp_path):
    y_fp32 = [0, 0, 0, 1, 1, 2, 2, 2, 1]
    paths = write_predictions(tmp_path, torch.tensor(Y_TRUE), np.array(Y_PRED), y_fp32)
    assert [path.name for path in paths] == ["y_test.csv", "y_pred.csv", "y_pred_fp32.csv"]
    assert read_csv_like_the_evaluation_app(paths[0]) == (["y_true"], Y_TRUE)
    assert read_csv_like_the_evaluation_app(paths[1]) == (["y_pred"], Y_PRED)
    assert read_csv_like_the_evaluation_app(paths[2]) == (["y_pred"], y_fp32)


def test_predictions_accept_integral_floats_and_reject_other_values(tmp_path):
    paths = write_predictions(tmp_path, [1.0, 2.0], [1, 2], [2, 2])
    assert read_csv_like_the_evaluation_app(paths[0]) == (["y_true"], [1, 2])
    with pytest.raises(ValueError, match="y_pred_int8"):
        write_predictions(tmp_path, [1, 2], [0.5, 2], [2, 2])


def test_predictions_of_different_lengths_are_refused(tmp_path):
    with pytest.raises(ValueError, match="same length"):
        write_predictions(tmp_path, [0, 1, 2], [0, 1], [0, 1, 2])


def test_summary_says_which_rounds_model_was_written_and_why(tmp_path, metrics):
    metrics["selection"] = {"kept_round": 2, "reason": "best validation loss 0.410 at round 2 of 3"}
    summary = {row[0]: row[1:] for row in read_html(write_report(tmp_path, metrics, Y_TRUE, Y_PRED,
                                                                 CONFIG_TEXT)).tables["summary"]}
    assert summary["Model written"] == ["round 2: best validation loss 0.410 at round 2 of 3"]


def test_summary_names_the_layers_kept_in_float(tmp_path, metrics):
    summary = rows_by_label(read_html(write_report(tmp_path, metrics, Y_TRUE, Y_PRED, CONFIG_TEXT)).tables["summary"])
    assert summary["Quantization"] == ["post_static (fx mode, x86 backend)"]
    metrics["float_layers"] = ["fc3"]
    summary = rows_by_label(read_html(write_report(tmp_path, metrics, Y_TRUE, Y_PRED, CONFIG_TEXT)).tables["summary"])
    assert summary["Quantization"] == ["post_static (fx mode, x86 backend; fc3 in float)"]


def test_summary_says_how_strong_the_logit_adjustment_was_and_why(tmp_path, metrics):
    metrics["logit_adjustment"] = {"strength": 0.5, "requested": "auto", "reason": "no setting excludes it"}
    summary = rows_by_label(read_html(write_report(tmp_path, metrics, Y_TRUE, Y_PRED, CONFIG_TEXT)).tables["summary"])
    assert summary["Logit adjustment"] == ["strength 0.5 (chosen by logit_adjustment: auto: no setting excludes it)"]
    metrics["logit_adjustment"] = {"strength": 0, "requested": 0, "reason": "set in config.yml"}
    summary = rows_by_label(read_html(write_report(tmp_path, metrics, Y_TRUE, Y_PRED, CONFIG_TEXT)).tables["summary"])
    assert summary["Logit adjustment"] == ["off"]


def test_summary_says_which_rule_and_average_were_used_and_why(tmp_path, metrics):
    metrics["aggregation"] = {"rule": "scaffold", "requested": "auto", "reason": "no setting excludes scaffold"}
    metrics["model_ema"] = {"decay": 0.7, "requested": "auto", "reason": "rounds of 0.25 epochs"}
    summary = rows_by_label(read_html(write_report(tmp_path, metrics, Y_TRUE, Y_PRED, CONFIG_TEXT)).tables["summary"])
    assert summary["Aggregation"] == ["scaffold (chosen by aggregation: auto: no setting excludes scaffold)"]
    assert summary["Averaging the rounds' models"] == ["decay 0.7 (chosen by model_ema: auto: rounds of 0.25 epochs)"]
    metrics["aggregation"] = {"rule": "fedavg", "requested": "fedavg", "reason": "set in config.yml"}
    metrics["model_ema"] = {"decay": 0, "requested": 0, "reason": "set in config.yml"}
    summary = rows_by_label(read_html(write_report(tmp_path, metrics, Y_TRUE, Y_PRED, CONFIG_TEXT)).tables["summary"])
    assert summary["Aggregation"] == ["fedavg"] and summary["Averaging the rounds' models"] == ["off"]
