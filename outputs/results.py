"""Write a site's outputs: the models, metrics.json/csv, predictions and the report."""
import csv
import json
import math
from pathlib import Path

from inputs.config import CONFIG_FILE
from outputs.atomic import atomic_open, copy_file, save_torch, write_text
from outputs.predictions import write_predictions
from outputs.report import write_report

FIGURES = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "validation_loss", "validation_accuracy")


def write_results(output_dir, config_file, float_model, metrics, predictions):
    """Write everything but the int8 files (Site.export_int8 wrote them); `metrics`:
    build_metrics' dict, `predictions`: "true", "fp32", "int8" label tensors."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # A copy of the config, so the next app of a FeatureCloud workflow finds it.
    copy_file(config_file, output_dir / CONFIG_FILE)
    save_torch(float_model.state_dict(), output_dir / "model_fp32.pt")
    write_text(output_dir / "metrics.json", metrics_json(metrics))
    write_rounds_csv(output_dir / "metrics.csv", metrics["rounds"], metrics["federation"]["rounds"])
    write_predictions(output_dir, predictions["true"], predictions["int8"], predictions["fp32"])
    write_report(output_dir, metrics, predictions["true"], predictions["int8"], Path(config_file).read_text())


def build_metrics(site_info, config, quantization_mode, rounds, bytes_sent, results, federation, privacy=None,
                  selection=None, aggregation=None, float_layers=(), logit_adjustment=None, model_ema=None):
    """metrics.json: this site's figures per round and fp32 vs int8, the federation's, the config
    (its aggregation the resolved rule; `aggregation`: {rule, requested, reason}, how it was
    chosen, inputs.config.resolve_aggregation) (and with `privacy`: which messages were secure-aggregated and what they cost, DP's budget;
    `selection`: which round's model was written and why, federation.selection.selection_report;
    `float_layers`: the layers the int8 model keeps in float; `logit_adjustment`: {strength,
    requested, reason}, inputs.config.resolve_logit_adjustment; `model_ema`: {decay, requested,
    reason}, inputs.config.resolve_model_ema)."""
    metrics = {
        "site": site_info,
        "backend": config.backend,
        "quant_type": config.quant_type,
        "quantization_mode": quantization_mode,
        "float_layers": list(float_layers),
        "n_train": results["n_train"],
        "n_test": results["n_test"],
        "n_validation": results.get("n_validation", 0),
        "rounds": [{**row, "bytes_sent": _round_bytes(bytes_sent, row["round"])} for row in rounds],
        "fp32": results["fp32"],
        "int8": results["int8"],
        "artifacts": results["artifacts"],
        "seconds": results["seconds"],
        "bytes_sent": {"total": sum(bytes_sent.values()), "by_memo": bytes_sent},
        "federation": {**federation["figures"], "rounds": federation["rounds"],
                       "sites": federation.get("sites", [])},
        "config": config.to_dict(),
        "aggregation": aggregation,
        "logit_adjustment": logit_adjustment,
        "model_ema": model_ema,
        "selection": selection,
    }
    if privacy is not None:
        metrics["privacy"] = privacy
    return metrics


def privacy_report(site, secure=None):
    """What metrics.json says about privacy: the secure-aggregated messages (JSON bytes sent
    against what the same content costs as a plain safetensors message, the fixed-point
    exponent, the time to send) and this site's DP budget (epsilon spent), or None."""
    if secure is None and site.dp_report is None:
        return None
    report = {"secure_aggregation": secure is not None, "dp": site.dp_report}
    if secure is not None:
        json_bytes = sum(entry["json_bytes"] for entry in secure.sent.values())
        plain_bytes = sum(entry["plain_bytes"] for entry in secure.sent.values())
        report.update(secure_messages=secure.sent,
                      plain_messages=sorted(memo for memo in site.bytes_sent if memo not in secure.sent),
                      secure_bytes={"json": json_bytes, "plain_equivalent": plain_bytes,
                                    "ratio": json_bytes / plain_bytes if plain_bytes else None})
    return report


def metrics_json(metrics):
    """metrics.json's text: strict JSON (no NaN or Infinity, which many readers refuse). Every
    figure from another site is range-checked when it arrives, so a non-finite number here is a
    bug: the error names the field."""
    try:
        return json.dumps(metrics, indent=2, allow_nan=False)
    except ValueError:
        path, value = next(_non_finite(metrics, "metrics"))
        raise ValueError(f"metrics.json: '{path}' is {value}, not a finite number") from None


def _non_finite(value, path):
    if isinstance(value, float) and not math.isfinite(value):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _non_finite(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _non_finite(item, f"{path}[{index}]")


def _round_bytes(bytes_by_memo, round_number):
    """Bytes this site sent in one round: its update, its test figures (coordinator: the model)."""
    return sum(size for memo, size in bytes_by_memo.items() if memo.endswith(f"_{round_number}"))


def write_rounds_csv(path, rounds, federation_rounds):
    """One row per round: this site's figures, then the federation-wide ones."""
    federation_by_round = {row["round"]: row for row in federation_rounds}
    columns = ("round", *FIGURES, "bytes_sent")
    header = list(columns) + [f"federation_{name}" for name in FIGURES]
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rounds:
            federation_row = federation_by_round.get(row["round"], {})
            writer.writerow([row[name] for name in columns]
                            + [federation_row.get(name) for name in FIGURES])
