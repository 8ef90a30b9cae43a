"""What the testbed prints: progress lines, the failure report, the fp32-vs-int8 tables."""
import json

from outputs import compare


def progress_key(status):
    return (status.get("state"), status.get("message"), status.get("progress"),
            bool(status.get("finished")))


def progress_line(site_name, status):
    """E.g. `[client_2] running   round 3/5  62%`."""
    state = status.get("state") or "running"  # the engine reports None until a state is set
    if status.get("finished") and state != "error":
        state = "finished"
    progress = status.get("progress")
    percent = "" if progress is None else f"  {progress * 100:.0f}%"
    return f"[{site_name}] {state:<9} {status.get('message') or ''}{percent}"


def failure_report(result, sites):
    lines = [f"FAILED: {result.message}"]
    failed = [site for site in sites if site.index == result.failed_site]
    shown = failed or [site for site in sites if not site.finished]
    for site in shown:
        status = site.last_status or {}
        lines.append(f"--- {site.name}: last status message {status.get('message')!r}, "
                     f"state {status.get('state')!r}; last lines of {site.log_path}:")
        lines.append(site.log_tail())
    return "\n".join(lines)


def _number(value, fmt):
    return format(value, fmt) if isinstance(value, (int, float)) else "?"


def metrics_table(site_name, metrics):
    """The fp32 vs int8 table of one site's metrics.json."""
    fp32, int8 = metrics.get("fp32", {}), metrics.get("int8", {})

    def row(label, key, fmt, scale=1.0):
        values = [m.get(key) for m in (fp32, int8)]
        cells = [_number(v / scale if isinstance(v, (int, float)) else v, fmt) for v in values]
        return f"  {label:<13}{cells[0]:>11}{cells[1]:>11}"

    def versus(key, how):
        text = how(fp32.get(key), int8.get(key))
        return f"   {text}" if text else ""

    lines = [f"{site_name:<15}{'fp32':>11}{'int8':>11}",
             row("accuracy", "accuracy", ".4f") + versus("accuracy", compare.point_change),
             row("size (KB)", "size_bytes", ".1f", scale=1024.0) + versus("size_bytes", compare.size),
             row("latency (ms)", "latency_ms", ".2f") + versus("latency_ms", compare.latency)]
    return "\n".join(lines)


def summary(site_outputs):
    """A metrics table per site, or a plain 'finished' line where no metrics.json was written."""
    blocks, federation = [], {}
    for index, output in enumerate(site_outputs, start=1):
        name = f"client_{index}"
        metrics_path = output / "metrics.json"
        if not metrics_path.is_file():
            blocks.append(f"[{name}] finished (outputs in {output})")
            continue
        try:
            metrics = json.loads(metrics_path.read_text())
        except ValueError as error:
            blocks.append(f"[{name}] finished, but {metrics_path} is not valid JSON: {error}")
            continue
        blocks.append(metrics_table(name, metrics))
        federation = metrics.get("federation", {})
    if "fp32" in federation and "int8" in federation:
        blocks.append(f"federation ({federation['n_sites']} sites, {federation['n_test']} test samples): "
                      f"accuracy fp32 {federation['fp32']['accuracy']:.4f}, int8 {federation['int8']['accuracy']:.4f}")
    return "\n\n".join(blocks)
