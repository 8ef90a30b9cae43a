"""What the testbed prints: progress lines, the failure report, the fp32-vs-int8 tables."""
import json
from pathlib import Path

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


def count(number, noun):
    """`1 site`, `3 sites`."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def finished_message(n_sites):
    return "the site finished" if n_sites == 1 else f"all {n_sites} sites finished"


def finished_line(result, out_dir):
    """The run's last line: how long it took, what crossed between the sites, where outputs are."""
    n_sites = len(result.site_outputs)
    if result.bytes_relayed:
        traffic = f"{result.bytes_relayed / 1024:.1f} KB relayed"
    elif n_sites == 1:
        traffic = "one site: no federation traffic"
    else:
        traffic = "nothing relayed"
    return f"{result.message} in {result.wall_time_s:.1f} s; {traffic}; outputs in {out_dir}"


def _number(value, fmt):
    return format(value, fmt) if isinstance(value, (int, float)) else "?"


def metrics_table(site_name, metrics):
    """One site's metrics.json as a table: fp32, the int8 model in PyTorch, and each int8 file
    measured in its own runtime (latency at the config's batch size, one thread); then how
    each int8 column compares with fp32."""
    batch = str((metrics.get("config") or {}).get("batch_size", ""))
    columns = [("fp32", metrics.get("fp32", {})), ("int8", metrics.get("int8", {}))]
    for artifact in metrics.get("artifacts") or []:
        latency = (artifact.get("latency_ms") or {}).get(batch)
        columns.append((Path(artifact.get("file", "?")).suffix, {**artifact, "latency_ms": latency}))

    def row(label, key, fmt, scale=1.0):
        cells = [_number(figures.get(key) / scale if isinstance(figures.get(key), (int, float))
                         else figures.get(key), fmt) for _, figures in columns]
        return f"  {label:<13}" + "".join(f"{cell:>11}" for cell in cells)

    fp32 = columns[0][1]
    lines = [f"{site_name:<15}" + "".join(f"{name:>11}" for name, _ in columns),
             row("accuracy", "accuracy", ".4f"),
             row("size (KB)", "size_bytes", ".1f", scale=1024.0),
             row("latency (ms)", "latency_ms", ".2f")]
    for name, figures in columns[1:]:
        versus = [compare.point_change(fp32.get("accuracy"), figures.get("accuracy")),
                  compare.size(fp32.get("size_bytes"), figures.get("size_bytes")),
                  compare.latency(fp32.get("latency_ms"), figures.get("latency_ms"))]
        lines.append(f"  {name} vs fp32: " + ", ".join(text for text in versus if text))
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
        blocks.append(f"federation ({count(federation['n_sites'], 'site')}, "
                      f"{count(federation['n_test'], 'test sample')}): "
                      f"accuracy fp32 {federation['fp32']['accuracy']:.4f}, int8 {federation['int8']['accuracy']:.4f}")
    return "\n\n".join(blocks)
