"""The local testbed, driven with the tiny echo app (tests/fixtures/echo_app) on the real engine."""
import json
import pickle
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from testbed import run_federation
from testbed.relay import smpc_sum
from testbed.report import metrics_table, summary

REPO = Path(__file__).resolve().parent.parent
ECHO_APP = REPO / "tests" / "fixtures" / "echo_app" / "main.py"
VALUES = {1: [1.5, 2.0], 2: [0.25, 3.0], 3: [4.0, -1.0]}
EXPECTED_SUM = [5.75, 4.0]

pytestmark = pytest.mark.timeout(60)


def make_sites(tmp_path, crash=None, **settings):
    """Three client dirs plus a generic dir; crash maps a site index to a crash mode."""
    crash = crash or {}
    generic = tmp_path / "generic"
    generic.mkdir()
    (generic / "settings.json").write_text(json.dumps(settings))
    client_dirs = []
    for index, values in VALUES.items():
        client_dir = tmp_path / f"site_{index}"
        client_dir.mkdir()
        (client_dir / "site.json").write_text(
            json.dumps({"values": values, "crash": crash.get(index)}))
        client_dirs.append(client_dir)
    return client_dirs, generic


def run_echo(tmp_path, crash=None, timeout=30, **kwargs):
    settings = {key: kwargs.pop(key) for key in ("use_smpc", "use_dp") if key in kwargs}
    client_dirs, generic = make_sites(tmp_path, crash, **settings)
    return run_federation(client_dirs, generic, tmp_path / "out", app=ECHO_APP,
                          query_interval=0.05, timeout=timeout, quiet=True, **kwargs)


def read_result(output_dir):
    return json.loads((output_dir / "result.json").read_text())


def refuses_connections(port):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=2)
    except (urllib.error.URLError, ConnectionError):
        return True
    return False


def test_three_sites_route_memos_and_broadcast_without_echo(tmp_path):
    deliveries = []
    web_pages = []

    def record(sender, receiver, memo, payload):
        deliveries.append((sender, receiver, memo))
        return payload

    def fetch_web_page(ports):
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/web/", timeout=5) as page:
            web_pages.append(page.read().decode())

    result = run_echo(tmp_path, relay_filter=record, on_started=fetch_web_page)

    assert result.ok, result.message
    assert [path.name for path in result.site_outputs] == ["client_1", "client_2", "client_3"]
    results = [read_result(output) for output in result.site_outputs]
    assert all(site["sum"] == EXPECTED_SUM for site in results)
    # Addressed sends reach exactly the site whose id they name.
    assert [site["greeting"] for site in results[1:]] == [f"hello {site['id']}" for site in results[1:]]
    by_memo = {}
    for sender, receiver, memo in deliveries:
        by_memo.setdefault(memo, []).append((sender, receiver))
    assert sorted(by_memo["numbers"]) == [(2, 1), (3, 1)]  # the coordinator keeps its own
    assert sorted(by_memo["sum"]) == [(1, 2), (1, 3)]  # broadcast, not echoed to client_1
    assert sorted(by_memo["greeting"]) == [(1, 2), (1, 3)]
    assert set(result.bytes_by_memo) == {"numbers", "sum", "greeting"}
    assert result.bytes_relayed == sum(result.bytes_by_memo.values()) > 0
    assert web_pages and web_pages[0].startswith("State: ")
    assert all(path.is_file() and path.stat().st_size > 0 for path in result.log_paths)


def test_smpc_sum_reaches_the_coordinator(tmp_path):
    deliveries = []

    def record(sender, receiver, memo, payload):
        deliveries.append((sender, receiver, memo))
        return payload

    result = run_echo(tmp_path, use_smpc=True, relay_filter=record)

    assert result.ok, result.message
    for output in result.site_outputs:
        assert read_result(output)["sum"] == pytest.approx(EXPECTED_SUM)
    # Every site, the coordinator included, contributes through the controller.
    assert sorted(pair[:2] for pair in deliveries if pair[2] == "numbers") == [(1, 1), (2, 1), (3, 1)]


def test_relay_filter_replaces_a_payload(tmp_path):
    def replace_site_3(sender, receiver, memo, payload):
        return pickle.dumps([100.0, 100.0]) if (sender, memo) == (3, "numbers") else payload

    result = run_echo(tmp_path, relay_filter=replace_site_3)

    assert result.ok, result.message
    expected = [VALUES[1][i] + VALUES[2][i] + 100.0 for i in range(2)]
    assert all(read_result(output)["sum"] == expected for output in result.site_outputs)


def test_site_error_stops_the_run_and_names_the_site(tmp_path):
    ports = []
    started = time.monotonic()
    result = run_echo(tmp_path, crash={2: "raise"}, on_started=ports.extend)

    assert not result.ok
    assert result.failed_site == 2
    assert "client_2" in result.message and "ValueError" in result.message
    assert time.monotonic() - started < 15
    assert all(refuses_connections(port) for port in ports)
    # What the sites wrote before the failure is kept.
    assert all((output / "started.txt").is_file() for output in result.site_outputs)


def test_killed_site_is_noticed_and_the_others_are_stopped(tmp_path):
    ports = []
    started = time.monotonic()
    result = run_echo(tmp_path, crash={3: "exit"}, on_started=ports.extend)

    assert not result.ok
    assert result.failed_site == 3
    assert "exited with code 3" in result.message
    assert time.monotonic() - started < 15
    assert all(refuses_connections(port) for port in ports)
    assert all((output / "started.txt").is_file() for output in result.site_outputs)


def test_whole_run_timeout_stops_every_site(tmp_path):
    ports = []
    result = run_echo(tmp_path, crash={2: "hang"}, timeout=4, on_started=ports.extend)

    assert not result.ok
    assert result.failed_site is None
    assert "timeout" in result.message and "client_2" in result.message
    assert result.wall_time_s < 10
    assert all(refuses_connections(port) for port in ports)


def test_site_whose_server_never_comes_up_fails(tmp_path):
    silent_app = tmp_path / "silent" / "main.py"
    silent_app.parent.mkdir()
    silent_app.write_text("import time\ntime.sleep(60)\n")
    client_dirs, generic = make_sites(tmp_path)

    result = run_federation(client_dirs, generic, tmp_path / "out", app=silent_app,
                            timeout=3, quiet=True)

    assert not result.ok
    assert "did not come up" in result.message
    assert result.wall_time_s < 10


def test_differential_privacy_is_rejected_clearly(tmp_path):
    result = run_echo(tmp_path, use_dp=True)

    assert not result.ok
    assert result.failed_site in (1, 2, 3)  # whichever DP payload the controller sees first
    assert "not supported by the testbed" in result.message


def test_cli_reports_the_failing_site_with_its_log_and_exits_1(tmp_path):
    client_dirs, generic = make_sites(tmp_path, crash={2: "raise"})
    command = [sys.executable, "-m", "testbed", "--app", str(ECHO_APP), "--generic", str(generic),
               "--out", str(tmp_path / "out"), "--query-interval", "0.05",
               *map(str, client_dirs)]

    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)

    assert completed.returncode == 1
    assert "FAILED: client_2" in completed.stdout
    assert "Traceback" in completed.stdout  # the tail of client_2's log
    assert (tmp_path / "out" / "logs" / "client_2.log").is_file()


def test_cli_prints_finished_lines_for_apps_without_metrics(tmp_path):
    client_dirs, generic = make_sites(tmp_path)
    command = [sys.executable, "-m", "testbed", "--app", str(ECHO_APP), "--generic", str(generic),
               "--out", str(tmp_path / "out"), "--query-interval", "0.05",
               *map(str, client_dirs)]

    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)

    assert completed.returncode == 0, completed.stdout + completed.stderr
    for index in (1, 2, 3):
        assert f"[client_{index}] finished (outputs in" in completed.stdout
    assert read_result(tmp_path / "out" / "client_2")["sum"] == EXPECTED_SUM


def test_smpc_sum_is_elementwise_in_fixed_point():
    payloads = [json.dumps([1.5, [2, 0.25]]).encode(), json.dumps([0.5, [1, 0.75]]).encode()]
    assert json.loads(smpc_sum(payloads, exponent=8)) == [2.0, [3.0, 1.0]]
    # Fixed point truncates below 10**-exponent, as the controller does.
    assert json.loads(smpc_sum([b"0.123456", b"0"], exponent=2)) == 0.12


@pytest.mark.parametrize("payloads", [[b"[1, 2]", b"[1]"], [b"[1]", b'["a"]'], [b"{}", b"{}"]])
def test_smpc_sum_rejects_mismatched_or_non_numeric_payloads(payloads):
    with pytest.raises((ValueError, TypeError)):
        smpc_sum(payloads, exponent=8)


def test_metrics_table_compares_fp32_and_int8(tmp_path):
    metrics = {"fp32": {"accuracy": 0.9712, "size_bytes": 4096, "latency_ms": 6.6},
               "int8": {"accuracy": 0.97, "size_bytes": 1024, "latency_ms": 2.2}}
    table = metrics_table("client_1", metrics)
    assert "0.9712" in table and "0.9700" in table
    assert "4.0" in table and "1.0" in table  # KB
    assert "-0.12 pp" in table
    assert "4.0x smaller" in table
    assert "3.0x faster" in table
    site = tmp_path / "client_1"
    site.mkdir()
    (site / "metrics.json").write_text(json.dumps(metrics))
    assert summary([site]) == table


# ---------------------------------------------------------------- summary wording, latency lock

def run_echo_cli(tmp_path, n_sites):
    client_dirs, generic = make_sites(tmp_path)
    command = [sys.executable, "-m", "testbed", "--app", str(ECHO_APP), "--generic", str(generic),
               "--out", str(tmp_path / "out"), "--query-interval", "0.05",
               *map(str, client_dirs[:n_sites])]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout.splitlines()[-1]


def test_cli_last_line_for_one_site_says_no_traffic_was_relayed(tmp_path):
    last_line = run_echo_cli(tmp_path, n_sites=1)
    assert last_line.startswith("the site finished in ")
    assert "one site: no federation traffic" in last_line
    wording = last_line.split("; outputs in ")[0]  # the output path is the test's tmp dir
    assert "KB" not in wording and "sites" not in wording


def test_cli_last_line_for_three_sites_counts_the_relayed_bytes(tmp_path):
    last_line = run_echo_cli(tmp_path, n_sites=3)
    assert last_line.startswith("all 3 sites finished in ")
    relayed_kb = float(last_line.split("; ")[1].removesuffix(" KB relayed"))
    assert relayed_kb > 0


def federation_metrics(n_sites, n_test):
    return {"fp32": {"accuracy": 0.9, "size_bytes": 4096, "latency_ms": 6.0},
            "int8": {"accuracy": 0.9, "size_bytes": 1024, "latency_ms": 2.0},
            "federation": {"n_sites": n_sites, "n_test": n_test,
                           "fp32": {"accuracy": 0.91}, "int8": {"accuracy": 0.92}}}


@pytest.mark.parametrize("n_sites, n_test, expected", [
    (1, 1, "federation (1 site, 1 test sample): accuracy fp32 0.9100, int8 0.9200"),
    (3, 1000, "federation (3 sites, 1000 test samples): accuracy fp32 0.9100, int8 0.9200")])
def test_summary_counts_sites_and_samples_in_words(tmp_path, n_sites, n_test, expected):
    site = tmp_path / "client_1"
    site.mkdir()
    (site / "metrics.json").write_text(json.dumps(federation_metrics(n_sites, n_test)))
    assert summary([site]).splitlines()[-1] == expected


def test_every_site_gets_one_shared_latency_lock_file(tmp_path, monkeypatch):
    monkeypatch.delenv("FC_LATENCY_LOCK", raising=False)
    result = run_echo(tmp_path)
    assert result.ok, result.message
    locks = {read_result(output)["latency_lock"] for output in result.site_outputs}
    assert len(locks) == 1
    lock = Path(locks.pop())
    assert lock.name == "latency.lock" and lock.parent.name.startswith("fc-testbed-")


def test_a_latency_lock_set_by_the_environment_is_kept(tmp_path, monkeypatch):
    shared = tmp_path / "shared.lock"
    monkeypatch.setenv("FC_LATENCY_LOCK", str(shared))
    result = run_echo(tmp_path)
    assert result.ok, result.message
    assert [read_result(output)["latency_lock"] for output in result.site_outputs] == [str(shared)] * 3


def test_testbed_and_quant_name_the_same_lock_variable():
    from quant.timing import LATENCY_LOCK_ENV
    from testbed.site import LATENCY_LOCK_ENV as TESTBED_LATENCY_LOCK_ENV
    assert TESTBED_LATENCY_LOCK_ENV == LATENCY_LOCK_ENV


def test_ports_are_distinct_free_and_below_the_ephemeral_range():
    """Each run's sites get distinct ports no outgoing connection can take before they bind."""
    from testbed import site
    ports = site.free_ports(20)
    assert len(set(ports)) == 20
    ephemeral_low = site._ephemeral_port_low()
    assert all(site.PRIVATE_PORT_RANGE[0] <= port < (ephemeral_low or 65536) for port in ports)
    assert all(site._can_bind(port) for port in ports)


def test_a_port_someone_listens_on_is_never_chosen(monkeypatch):
    import socket
    from testbed import site
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr(site, "PRIVATE_PORT_RANGE", (port, port))
        monkeypatch.setattr(site, "_ephemeral_port_low", lambda: None)
        with pytest.raises(RuntimeError, match=f"fewer than 1 free ports in {port}-{port}"):
            site.free_ports(1)
