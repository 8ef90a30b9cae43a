"""report.html: one self-contained page with a site's results, for people to read.

The page needs nothing but itself: CSS is inline and figures are embedded as base64 PNG, so
it can be mailed or opened from the output folder offline. The same figures are also written
next to it as PNG files (rounds.png, fp32_vs_int8.png, confusion_matrix.png).
"""
from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

from outputs import compare
from outputs.atomic import write_text
from outputs.plots import plot_confusion_matrix, plot_fp32_vs_int8, plot_rounds

REPORT_FILE = "report.html"
ROUNDS_FIGURE = "rounds.png"
FP32_VS_INT8_FIGURE = "fp32_vs_int8.png"
CONFUSION_MATRIX_FIGURE = "confusion_matrix.png"
MISSING = "n/a"

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; background: #fff; padding: 0 1em; }
h1 { font-size: 1.6em; border-bottom: 3px solid #1f77b4; padding-bottom: .3em; }
h2 { font-size: 1.25em; margin-top: 2em; color: #1f4e79; }
table { border-collapse: collapse; margin: .5em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: .3em .7em; text-align: right; }
th { background: #eef3f8; }
th[colspan] { text-align: center; }
th.row-label, td.row-label { text-align: left; }
.summary td { text-align: left; }
p.caption { color: #555; font-size: .92em; max-width: 900px; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f6f8fa; border: 1px solid #ddd; padding: 1em; overflow-x: auto; }
table.confusion td { min-width: 2.5em; text-align: center; }
"""


def confusion_matrix(y_true, y_pred) -> tuple[list[int], np.ndarray]:
    """(class labels, counts) with counts[i, j] = samples of class labels[i] predicted as labels[j].

    The labels are every class that occurs in y_true or y_pred, sorted.
    """
    y_true = np.asarray(y_true).ravel().astype(int)
    y_pred = np.asarray(y_pred).ravel().astype(int)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"confusion_matrix: y_true has {y_true.size} labels but y_pred has "
                         f"{y_pred.size} predictions")
    labels = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    index_of = {label: index for index, label in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels)), dtype=int)
    for true_label, predicted_label in zip(y_true.tolist(), y_pred.tolist()):
        counts[index_of[true_label], index_of[predicted_label]] += 1
    return labels, counts


def write_report(output_dir, metrics: dict, y_true, y_pred_int8, config_text: str) -> Path:
    """Write report.html and its three PNG figures into output_dir; return the report's path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    labels, counts = confusion_matrix(y_true, y_pred_int8)
    rounds_png = plot_rounds(metrics, output_dir / ROUNDS_FIGURE)
    comparison_png = plot_fp32_vs_int8(metrics, output_dir / FP32_VS_INT8_FIGURE)
    plot_confusion_matrix(counts, labels, output_dir / CONFUSION_MATRIX_FIGURE)
    sections = [
        _summary_section(metrics),
        _comparison_section(metrics, comparison_png),
        _artifacts_section(metrics),
        _rounds_section(metrics, rounds_png),
        _sites_section(metrics),
        _confusion_section(labels, counts),
        _privacy_section(metrics.get("privacy")),
        _config_section(config_text),
    ]
    page = _page(f"Federated training report: site {_site_id(metrics)}", sections)
    return write_text(output_dir / REPORT_FILE, page)


# ---- sections ---------------------------------------------------------------------------

def _auto_choice_text(choice, key, value_key, show):
    """A setting that may be `auto` (metrics.json's {<value_key>, requested, reason}, one per
    resolve_* in inputs.config): its value as `show` words it, and with `<key>: auto` why it
    became that."""
    if not choice:
        return MISSING
    shown = show(choice.get(value_key, MISSING))
    if choice.get("requested") == "auto":
        return f"{shown} (chosen by {key}: auto: {choice.get('reason', MISSING)})"
    return shown


def _off_or(label):
    """Words for a number where 0 means off: "off", or "<label> <value>"."""
    return lambda value: "off" if value == 0 else f"{label} {value}"


def _summary_section(metrics):
    site = metrics.get("site") or {}
    federation = metrics.get("federation") or {}
    role = "coordinator" if site.get("coordinator") else "participant"
    rows = [
        ("Site", f"{_site_id(metrics)} ({role})"),
        ("Quantization", f"{metrics.get('quant_type', MISSING)} "
                         f"({metrics.get('quantization_mode', MISSING)} mode, "
                         f"{metrics.get('backend', MISSING)} backend"
                         + "".join(f"; {name} in float" for name in metrics.get("float_layers") or []) + ")"),
        ("This site's samples", f"{_count(metrics.get('n_train'))} train, "
                                f"{_count(metrics.get('n_test'))} test"),
        ("Federation", f"{_count(federation.get('n_sites'))} sites, "
                       f"{_count(federation.get('n_train'))} train, "
                       f"{_count(federation.get('n_test'))} test samples"),
        ("Rounds", _count(len(metrics.get("rounds") or []))),
        ("Aggregation", _auto_choice_text(metrics.get("aggregation"), "aggregation", "rule", str)),
        ("Logit adjustment", _auto_choice_text(metrics.get("logit_adjustment"), "logit_adjustment", "strength",
                                               _off_or("strength"))),
        ("Averaging the rounds' models", _auto_choice_text(metrics.get("model_ema"), "model_ema", "decay",
                                                           _off_or("decay"))),
        ("Model written", _selection_text(metrics.get("selection"))),
    ]
    body = "".join(f"<tr><th class='row-label'>{_text(name)}</th><td>{_text(value)}</td></tr>"
                   for name, value in rows)
    return f"<h2>Run</h2><table class='summary' id='summary'>{body}</table>"


def _selection_text(selection):
    """Which round's global model was quantized and written, and why (federation.selection)."""
    if not selection:
        return MISSING
    return f"round {selection['kept_round']}: {selection['reason']}"


def _comparison_section(metrics, figure_path):
    federation = metrics.get("federation") or {}
    return "".join([
        "<h2>fp32 model vs int8 model</h2>",
        "<h3>This site</h3>",
        _comparison_table("site-fp32-int8", metrics.get("fp32") or {}, metrics.get("int8") or {}),
        "<p class='caption'>Both models are the same federated model: int8 is the quantized "
        "copy every site takes home. The last column shows what quantization cost or gained "
        "on this site's test set: accuracy change in percentage points, how many times "
        "smaller the saved file is and how many times faster one batch runs.</p>",
        "<h3>Federation (all sites' test sets together)</h3>",
        _comparison_table("federation-fp32-int8", federation.get("fp32") or {},
                          federation.get("int8") or {}),
        "<p class='caption'>Accuracy and loss over every site's test samples, weighted by "
        "each site's test-set size: the figures for the federation as a whole.</p>",
        _figure(figure_path, "fp32 vs int8 bar charts"),
        "<p class='caption'>Grey bars are the fp32 model, green bars the int8 model, on this "
        "site: accuracy should be nearly equal while size (and usually latency) drop.</p>",
    ])


def _artifacts_section(metrics):
    """The int8 files side by side with fp32, each measured in its own runtime on this site."""
    artifacts = metrics.get("artifacts") or []
    if not artifacts:
        return ""
    fp32 = metrics.get("fp32") or {}
    batch = str((metrics.get("config") or {}).get("batch_size", ""))
    head = ("<tr><th class='row-label'>File</th><th>Runs in</th><th>Accuracy</th><th>vs fp32</th>"
            "<th>Size</th><th>vs fp32</th><th>Latency, batch 1</th>"
            f"<th>Latency, batch {_text(batch)}</th><th>vs fp32 (batch {_text(batch)})</th><th>SHA-256</th></tr>")
    rows = [f"<tr><td class='row-label'>model_fp32.pt (fp32)</td><td>PyTorch</td>"
            f"<td>{_percent(fp32.get('accuracy'))}</td><td></td><td>{_kilobytes(fp32.get('size_bytes'))}</td>"
            f"<td></td><td></td><td>{_milliseconds(fp32.get('latency_ms'))}</td><td></td><td></td></tr>"]
    for artifact in artifacts:
        latency = artifact.get("latency_ms") or {}
        name = str(artifact.get("file", MISSING))
        rows.append(
            f"<tr><td class='row-label'>{_text(name)}</td><td>{_text(RUNTIMES.get(Path(name).suffix, MISSING))}</td>"
            f"<td>{_percent(artifact.get('accuracy'))}</td>"
            f"<td>{compare.point_change(fp32.get('accuracy'), artifact.get('accuracy')) or MISSING}</td>"
            f"<td>{_kilobytes(artifact.get('size_bytes'))}</td>"
            f"<td>{compare.size(fp32.get('size_bytes'), artifact.get('size_bytes')) or MISSING}</td>"
            f"<td>{_milliseconds(latency.get('1'))}</td><td>{_milliseconds(latency.get(batch))}</td>"
            f"<td>{compare.latency(fp32.get('latency_ms'), latency.get(batch)) or MISSING}</td>"
            f"<td><code>{_text(str(artifact.get('sha256', MISSING))[:16])}</code></td></tr>")
    return "".join([
        "<h2>The int8 files</h2>",
        f"<table id='artifacts'>{head}{''.join(rows)}</table>",
        "<p class='caption'>Each file was loaded in its own runtime and run on this site's test "
        "set (one thread). Every site holds the same bytes: the coordinator compared their "
        "digests before the run finished.</p>",
    ])


def _comparison_table(table_id, fp32, int8):
    head = ("<tr><th class='row-label'>Metric</th><th>fp32</th><th>int8</th>"
            "<th>int8 vs fp32</th></tr>")
    rows = []
    for key, label, show, versus in _COMPARED_METRICS:
        if fp32.get(key) is None and int8.get(key) is None:
            continue  # e.g. the federation reports no size or latency
        rows.append(f"<tr><td class='row-label'>{label}</td><td>{show(fp32.get(key))}</td>"
                    f"<td>{show(int8.get(key))}</td>"
                    f"<td>{versus(fp32.get(key), int8.get(key)) or MISSING}</td></tr>")
    return f"<table id='{table_id}'>{head}{''.join(rows)}</table>"


def _rounds_section(metrics, figure_path):
    site_rows = {row["round"]: row for row in metrics.get("rounds") or []}
    federation_rows = {row["round"]: row
                       for row in (metrics.get("federation") or {}).get("rounds") or []}
    columns = (("train_loss", "train loss", _loss), ("train_accuracy", "train acc.", _percent),
               ("test_loss", "test loss", _loss), ("test_accuracy", "test acc.", _percent),
               ("validation_loss", "val. loss", _loss), ("validation_accuracy", "val. acc.", _percent))
    group_head = (f"<tr><th rowspan='2'>Round</th><th colspan='{len(columns)}'>This site</th>"
                  f"<th colspan='{len(columns)}'>Federation</th></tr>")
    column_head = "<tr>" + "".join(f"<th>{name}</th>" for _, name, _ in columns) * 2 + "</tr>"
    body = []
    for round_number in sorted(set(site_rows) | set(federation_rows)):
        cells = [f"<td>{round_number}</td>"]
        for rows in (site_rows, federation_rows):
            row = rows.get(round_number, {})
            cells += [f"<td>{show(row.get(key))}</td>" for key, _, show in columns]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return "".join([
        "<h2>Training rounds</h2>",
        _figure(figure_path, "test accuracy and loss per round"),
        "<p class='caption'>Test accuracy and loss of the global (averaged) model after each "
        "round, on this site's test set (blue) and over all sites (orange). Curves that level "
        "off mean more rounds would add little.</p>",
        f"<table id='rounds'>{group_head}{column_head}{''.join(body)}</table>",
        "<p class='caption'>Train figures are measured during local training in that round; "
        "test and validation figures are those of the global model that the round produced "
        f"({MISSING}: not measured). The validation split is held out of each site's training "
        "data; the federation's validation loss selects the round written (Run: Model written).</p>",
    ])


def _sites_section(metrics):
    """What each site claimed and what weight the coordinator gave it (nobody can verify a
    site's n_train: the cap `max_site_weight` bounds what a false claim can do)."""
    sites = (metrics.get("federation") or {}).get("sites") or []
    if not sites:
        return ""
    config = metrics.get("config") or {}
    head = ("<tr><th class='row-label'>Site</th><th>claimed n_train</th>"
            "<th>share of the averaging weight (last round)</th><th>rounds left out</th></tr>")
    body = "".join(
        f"<tr><td class='row-label'>{_text(site.get('id'))}</td><td>{_count(site.get('n_train'))}</td>"
        f"<td>{_percent(site.get('weight'))}</td>"
        f"<td>{_text(', '.join(map(str, site.get('excluded_rounds') or [])) or 'none')}</td></tr>"
        for site in sites)
    return "".join([
        "<h2>Sites as the coordinator saw them</h2>",
        f"<table id='sites'>{head}{body}</table>",
        "<p class='caption'>Each site's number of training samples as it claimed it (no other "
        "site can check it) and the share of the averaging weight its update got "
        f"(robust_aggregation: {_text(config.get('robust_aggregation', MISSING))}, "
        f"max_site_weight: {_text(config.get('max_site_weight', MISSING))}). A round listed as "
        "left out: that site's update was an outlier (outlier_factor: "
        f"{_text(config.get('outlier_factor', MISSING))}) or looked like random noise "
        f"(min_cosine: {_text(config.get('min_cosine', MISSING))}) and was not averaged in.</p>",
    ])


def _confusion_section(labels, counts):
    largest = counts.max() if counts.size else 0
    head = ("<tr><th>true \\ predicted</th>"
            + "".join(f"<th>{_text(label)}</th>" for label in labels) + "</tr>")
    body = []
    for label, row in zip(labels, counts):
        cells = "".join(_heat_cell(int(count), largest) for count in row)
        body.append(f"<tr><th>{_text(label)}</th>{cells}</tr>")
    correct, total = int(np.trace(counts)), int(counts.sum())
    accuracy = f"{100 * correct / total:.2f} %" if total else MISSING
    return "".join([
        "<h2>Confusion matrix of the int8 model (this site's test set)</h2>",
        f"<table class='confusion' id='confusion-matrix'>{head}{''.join(body)}</table>",
        f"<p class='caption'>Row: the true class; column: the class the int8 model predicted. "
        f"The diagonal holds the correct predictions ({correct} of {total}, {accuracy}); a "
        f"dark cell off the diagonal is a pair of classes the model confuses.</p>",
    ])


def _privacy_section(privacy):
    """Which messages were secure-aggregated and what that cost; DP's budget (metrics.json's
    "privacy"); nothing when neither was on."""
    if not privacy:
        return ""
    parts = ["<h2>Privacy</h2>"]
    if privacy.get("secure_aggregation"):
        head = ("<tr><th class='row-label'>Message</th><th>sent as</th><th>JSON bytes</th>"
                "<th>plain bytes</th><th>JSON vs plain</th><th>fixed-point decimals</th></tr>")
        rows = []
        for memo, entry in (privacy.get("secure_messages") or {}).items():
            ratio = entry["json_bytes"] / entry["plain_bytes"] if entry.get("plain_bytes") else None
            rows.append(f"<tr><td class='row-label'>{_text(memo)}</td><td>secure sum (SMPC)</td>"
                        f"<td>{entry['json_bytes']:,}</td><td>{entry['plain_bytes']:,}</td>"
                        f"<td>{MISSING if ratio is None else f'{ratio:.1f}x'}</td>"
                        f"<td>{entry['exponent']}</td></tr>")
        for memo in privacy.get("plain_messages") or []:
            rows.append(f"<tr><td class='row-label'>{_text(memo)}</td><td>plain (no site's data)</td>"
                        f"<td colspan='4'></td></tr>")
        totals = privacy.get("secure_bytes") or {}
        parts += [
            f"<table id='secure-messages'>{head}{''.join(rows)}</table>",
            "<p class='caption'>Secure aggregation: every message the coordinator only needs summed "
            "went through FeatureCloud's SMPC (fixed point, secret shares); the coordinator saw only "
            "the federation's sums, never this site's update, figures or calibration statistics. "
            f"They cost {_count(totals.get('json'))} JSON bytes from this site against "
            f"{_count(totals.get('plain_equivalent'))} as plain safetensors messages"
            + (f" ({totals['ratio']:.1f}x)" if totals.get("ratio") else "") + ".</p>"]
    dp = privacy.get("dp")
    if dp:
        rows = [("Budget (epsilon, delta)", f"{dp['epsilon_target']:g}, {dp['delta']:g}"),
                ("Epsilon spent (RDP accountant)", f"{dp['epsilon_spent']:.3f}"),
                ("Noise multiplier", f"{dp['noise_multiplier']:.3f}"),
                ("Per-sample clipping norm", f"{dp['max_grad_norm']:g}"),
                ("Sampling rate, steps", f"{dp['sample_rate']:.4f}, {dp['steps']}")]
        distributed = dp.get("noise") == "distributed"
        if distributed:
            rows += [("Noise", f"distributed: this site's share {dp['noise_multiplier_own_share']:.3f} "
                               f"of {dp['n_sites']} sites' shares"),
                     ("Colluding sites the guarantee holds against", f"{dp['colluding_sites']}"),
                     ("Epsilon if every other site and the coordinator collude",
                      f"{dp['epsilon_if_peers_collude']:.3f}")]
        body = "".join(f"<tr><th class='row-label'>{_text(name)}</th><td>{_text(value)}</td></tr>"
                       for name, value in rows)
        how = ("DP-SGD on the union of the sites' data, each step a secure sum of the sites' clipped "
               "gradient sums, each with its share of the noise: the guarantee holds for the sum the "
               "coordinator sees, as long as the other sites add their shares and no more than "
               f"{dp['colluding_sites']} of them pool what they know with the coordinator"
               if distributed else "DP-SGD, Opacus")
        parts += [f"<table class='summary' id='dp'>{body}</table>",
                  f"<p class='caption'>Sample-level differential privacy ({how}) for this "
                  "site's training samples over the whole run. Not covered: the train and test "
                  "figures, the sample counts and the calibration statistics (README.md, "
                  "\"Differential privacy\").</p>"]
    return "".join(parts)


def _config_section(config_text):
    return ("<h2>Configuration</h2>"
            f"<pre id='config'>{html.escape(config_text or '')}</pre>"
            "<p class='caption'>The config.yml this run was started with.</p>")


# ---- html pieces ------------------------------------------------------------------------

def _page(title, sections):
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{_text(title)}</title><style>{STYLE}</style></head>"
            f"<body><h1>{_text(title)}</h1>{''.join(sections)}</body></html>\n")


def _figure(path, description):
    encoded = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"<img src='data:image/png;base64,{encoded}' alt='{_text(description)}'>"


def _heat_cell(count, largest):
    # Blue with opacity proportional to the count; white text once the cell gets dark.
    strength = count / largest if largest else 0.0
    text_color = "#fff" if strength > 0.55 else "#222"
    return (f"<td style='background: rgba(31, 119, 180, {strength:.3f}); "
            f"color: {text_color}'>{count}</td>")


def _text(value):
    return html.escape(str(value))


def _site_id(metrics):
    return (metrics.get("site") or {}).get("id", "unknown")


# ---- number formats (one per kind of value) -----------------------------------------------

def _count(value):
    return MISSING if value is None else str(value)


def _percent(fraction):
    return MISSING if fraction is None else f"{100 * fraction:.2f} %"


def _loss(value):
    return MISSING if value is None else f"{value:.4f}"


def _kilobytes(size_bytes):
    return MISSING if size_bytes is None else f"{size_bytes / 1024:.1f} KB"


def _milliseconds(value):
    return MISSING if value is None else f"{value:.2f} ms"


# Where each int8 file runs (README: "Running the int8 model").
RUNTIMES = {".pt": "PyTorch (TorchScript)", ".pte": "ExecuTorch (XNNPACK)", ".onnx": "ONNX Runtime",
            ".pt2": "PyTorch (torch.export)"}

# (metrics key, row label, how to show one value, how to compare fp32 with int8: outputs.compare)
_COMPARED_METRICS = (
    ("accuracy", "Accuracy", _percent, compare.point_change),
    ("loss", "Loss", _loss, compare.difference),
    ("size_bytes", "Size", _kilobytes, compare.size),
    ("latency_ms", "Latency", _milliseconds, compare.latency),
)
