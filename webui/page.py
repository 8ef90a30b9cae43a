"""The status page as one self-contained HTML document (no scripts, no external files)."""
from html import escape

from outputs import compare  # standard library only, like this module

MISSING = "–"
REFRESH_SECONDS = 2

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 46em; color: #222; }
h1 { font-size: 1.3em; }
h2 { font-size: 1.1em; margin-top: 1.5em; }
dl { display: grid; grid-template-columns: max-content auto; gap: .3em 1.2em; }
dt { color: #666; }
dd { margin: 0; }
table { border-collapse: collapse; margin-top: .5em; }
th, td { border-bottom: 1px solid #ddd; padding: .3em .8em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.error { color: #b00020; font-weight: bold; }
"""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _percent(fraction) -> str:
    return f"{100 * fraction:.2f} %" if _is_number(fraction) else MISSING


def _kilobytes(size_bytes) -> str:
    return f"{size_bytes / 1024:.1f} KB" if _is_number(size_bytes) else MISSING


def _milliseconds(latency_ms) -> str:
    return f"{latency_ms:.2f} ms" if _is_number(latency_ms) else MISSING


def _plain(value) -> str:
    return f"{value:.4f}" if _is_number(value) else MISSING


def _round_text(status: dict) -> str:
    round_number, max_iter = status.get("round"), status.get("max_iter")
    if round_number is None:
        return MISSING
    return f"round {round_number} of {max_iter if max_iter is not None else '?'}"


def _site_title(status: dict) -> str:
    title = f"Site {status.get('site_id', '?')}"
    return title + " (coordinator)" if status.get("coordinator") else title


def _overview(status: dict) -> str:
    rows = [
        ("State", status.get("state", "starting")),
        ("Message", status.get("message", MISSING)),
        ("Progress", _round_text(status)),
        ("Federation accuracy", _percent(status.get("federation_accuracy"))),
        ("Site accuracy", _percent(status.get("site_accuracy"))),
        ("Finished", "yes" if status.get("finished") else "no"),
    ]
    cells = "".join(f"<dt>{escape(name)}</dt><dd>{escape(str(value))}</dd>" for name, value in rows)
    return f"<dl>{cells}</dl>"


def _comparison_row(label: str, fp32: dict, int8: dict, key: str, fmt, versus) -> str:
    """versus: an outputs.compare function of (fp32, int8)."""
    versus_text = versus(fp32.get(key), int8.get(key)) or MISSING
    cells = [label, fmt(fp32.get(key)), fmt(int8.get(key)), versus_text]
    return "<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in cells) + "</tr>"


def _results_table(results: dict) -> str:
    site, federation = results.get("site", {}), results.get("federation", {})
    site_fp32, site_int8 = site.get("fp32", {}), site.get("int8", {})
    fed_fp32, fed_int8 = federation.get("fp32", {}), federation.get("int8", {})
    rows = [
        _comparison_row("Site accuracy", site_fp32, site_int8, "accuracy", _percent, compare.point_change),
        _comparison_row("Site loss", site_fp32, site_int8, "loss", _plain, compare.difference),
        _comparison_row("Model size", site_fp32, site_int8, "size_bytes", _kilobytes, compare.size),
        _comparison_row("Latency", site_fp32, site_int8, "latency_ms", _milliseconds, compare.latency),
        _comparison_row("Federation accuracy", fed_fp32, fed_int8, "accuracy", _percent, compare.point_change),
        _comparison_row("Federation loss", fed_fp32, fed_int8, "loss", _plain, compare.difference),
    ]
    header = "<tr><th></th><th>fp32</th><th>int8</th><th>int8 vs fp32</th></tr>"
    return f"<h2>fp32 vs int8</h2><table>{header}{''.join(rows)}</table>"


def render_page(status: dict) -> str:
    """The whole page for one snapshot of `webui.live_status`; every shown value is HTML-escaped."""
    finished = bool(status.get("finished"))
    # A finished site no longer changes, so the page stops reloading itself.
    refresh = "" if finished else f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">'
    error = status.get("error")
    parts = [
        f"<h1>{escape(_site_title(status))}</h1>",
        f'<p class="error">Error: {escape(str(error))}</p>' if error else "",
        _overview(status),
        _results_table(status["results"]) if finished and status.get("results") else "",
    ]
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"{refresh}<title>{escape(_site_title(status))}: {escape(str(status.get('state', 'starting')))}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )
