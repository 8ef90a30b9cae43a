"""The live status page: what it shows, that it escapes, and its JSON twin."""
import io
import json
from wsgiref.util import setup_testing_defaults

import pytest

from webui import LiveStatus, make_web_server, render_page

FINISHED_RESULTS = {
    "site": {
        "fp32": {"accuracy": 0.9812, "loss": 0.061, "size_bytes": 102400, "latency_ms": 2.0},
        "int8": {"accuracy": 0.9790, "loss": 0.066, "size_bytes": 25600, "latency_ms": 0.5},
    },
    "federation": {"fp32": {"accuracy": 0.9700, "loss": 0.09}, "int8": {"accuracy": 0.9650, "loss": 0.1}},
}


def wsgi_get(app, path: str):
    """One GET through the app's WSGI interface, as any server would call it."""
    environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO()}
    setup_testing_defaults(environ)
    captured = {}

    def start_response(status, headers, exc_info=None):
        captured["status"], captured["headers"] = status, dict(headers)

    body = b"".join(app(environ, start_response))
    return captured["status"], captured["headers"], body.decode("utf-8")


def test_running_page_shows_state_round_and_federation_accuracy():
    html = render_page({"site_id": "0a1b", "state": "local_train", "round": 3, "max_iter": 10,
                        "federation_accuracy": 0.8765})
    assert "local_train" in html
    assert "round 3 of 10" in html
    assert "87.65 %" in html
    assert 'http-equiv="refresh"' in html
    assert "fp32 vs int8" not in html


def test_finished_page_shows_fp32_int8_table_and_stops_refreshing():
    html = render_page({"state": "terminal", "finished": True, "results": FINISHED_RESULTS})
    assert "fp32 vs int8" in html
    assert "98.12 %" in html and "97.90 %" in html      # site accuracies
    assert "100.0 KB" in html and "25.0 KB" in html      # sizes
    assert "2.00 ms" in html and "0.50 ms" in html       # latencies
    assert "4.0x smaller" in html and "4.0x faster" in html  # size and latency, fp32 vs int8
    assert "×" not in html
    assert "-0.22 pp" in html                            # site accuracy difference
    assert "-0.50 pp" in html                            # federation accuracy difference
    assert "+0.0050" in html and "+0.0100" in html       # loss differences, int8 - fp32
    assert 'http-equiv="refresh"' not in html


def test_missing_result_figures_show_a_dash_instead_of_failing():
    partial = {"site": {"fp32": {"accuracy": 0.9}, "int8": {}}, "federation": {}}
    html = render_page({"finished": True, "results": partial})
    assert "90.00 %" in html and "–" in html


def test_every_shown_value_is_escaped():
    hostile = "<script>alert(1)</script>"
    html = render_page({"site_id": hostile, "state": hostile, "message": hostile, "error": hostile})
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_update_refuses_unknown_fields_and_names_them():
    with pytest.raises(TypeError, match="federation_acc"):
        LiveStatus().update(federation_acc=0.5)


def test_snapshot_is_a_copy_not_a_view():
    status = LiveStatus()
    results = {"site": {"fp32": {"accuracy": 0.5}}}
    status.update(results=results, round=1)
    results["site"]["fp32"]["accuracy"] = 0.0
    snapshot = status.snapshot()
    snapshot["round"] = 99
    assert status.snapshot() == {"results": {"site": {"fp32": {"accuracy": 0.5}}}, "round": 1}


def test_web_server_serves_page_and_status_json():
    status = LiveStatus()
    status.update(state="aggregate", round=2, max_iter=5, federation_accuracy=0.5, coordinator=True)
    app = make_web_server(status)

    code, headers, html = wsgi_get(app, "/")
    assert code.startswith("200") and headers["Content-Type"].startswith("text/html")
    assert "aggregate" in html and "round 2 of 5" in html and "(coordinator)" in html

    code, headers, body = wsgi_get(app, "/status.json")
    assert code.startswith("200") and headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == status.snapshot()

    status.update(round=3)
    assert json.loads(wsgi_get(app, "/status.json")[2])["round"] == 3
