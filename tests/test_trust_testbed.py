"""Trust between sites, end to end: the testbed's own robustness (sites die with it, a stopped
site is named) with the echo app, and the real app refusing what a hostile relay or peer sends,
exiting user code and a hang, each asserting the message the controller sees."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import testbed
from testbed import Delivery
from tests.e2e_helpers import QUICK, SAMPLE_CLIENTS, make_client, make_generic
from tests.test_testbed import ECHO_APP, REPO, make_sites, run_echo

pytestmark = pytest.mark.timeout(90)


def processes_with(marker):
    """Pids of live (not zombie) processes whose environment contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if marker.encode() in environ and state != "Z":
            found.append(int(entry.name))
    return found


def wait_for(predicate, timeout, step=0.1):
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def test_sites_and_temp_dir_go_with_a_sigkilled_testbed(tmp_path):
    client_dirs, generic = make_sites(tmp_path, crash={2: "hang"})
    temp = tmp_path / "tmp"
    temp.mkdir()
    command = [sys.executable, "-m", "testbed", "--app", str(ECHO_APP), "--generic", str(generic),
               "--out", str(tmp_path / "out"), "--query-interval", "0.05", "--timeout", "60",
               *map(str, client_dirs)]
    runner = subprocess.Popen(command, cwd=REPO, env={**os.environ, "TMPDIR": str(temp)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = lambda: len(list(temp.glob("fc-testbed-*/client_*/output/started.txt"))) == 3  # noqa: E731
        assert wait_for(started, 30), "the sites did not start"
        marker = f"FC_INPUT_DIR={temp}"
        assert len(processes_with(marker)) == 3
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=5)
        assert wait_for(lambda: not processes_with(marker), 5), "sites outlived the testbed"
        assert wait_for(lambda: not list(temp.iterdir()), 5), f"left behind: {list(temp.iterdir())}"
    finally:
        runner.kill()
        for pid in processes_with(f"FC_INPUT_DIR={temp}"):
            os.kill(pid, signal.SIGKILL)


def test_a_stopped_site_is_named_as_not_responding(tmp_path):
    started = time.monotonic()
    result = run_echo(tmp_path, crash={3: "stop"}, response_timeout=2)
    assert not result.ok and result.failed_site == 3
    assert result.message.startswith("client_3: site 3 not responding for 2 s (")
    assert result.message.endswith("timed out; its process is stopped (SIGSTOP?))")
    assert time.monotonic() - started < 20


# ---------------------------------------------------------------- the real app

def run_app(tmp_path, clients=SAMPLE_CLIENTS, **options):
    generic = make_generic(tmp_path / "generic", QUICK)
    return testbed.run_federation(clients, generic, tmp_path / "out", quiet=True, timeout=60,
                                  **options)


def error_message(result, site):
    """The error message (at most 40 characters) the controller saw from a site (1-based)."""
    status = result.last_status[site - 1] or {}
    return status.get("message") if status.get("state") == "error" else None


def test_a_duplicate_delivery_is_refused_naming_the_sender(tmp_path):
    def twice(sender, receiver, memo, payload):
        return [Delivery(payload)] * 2 if (sender, memo) == (2, "summary") else payload

    result = run_app(tmp_path, relay_filter=twice)
    assert not result.ok and result.failed_site == 1
    assert error_message(result, 1).startswith("dup summary from #2 ")
    assert "'summary' from client_2 refused (HTTP 409): refused a second payload under memo " \
           "'summary': each site sends one per memo (from site 2 of 3" in result.message
    assert "ERROR at this site: refused a second payload" in result.log_paths[0].read_text()


# (A global model from another participant is refused the same way: test_trust_engine.)
@pytest.mark.parametrize("claimed, text, short", [
    ("f" * 16, "the sender is not a client of this run", "refused global_0 from unknown ffffffff"),
], ids=["unknown sender"])
def test_a_forged_global_model_is_refused_naming_the_sender(tmp_path, claimed, text, short):
    def forge(sender, receiver, memo, payload):
        if (sender, receiver, memo) == (1, 2, "global_0"):
            return [Delivery(payload, sender=claimed)]
        return payload

    result = run_app(tmp_path, relay_filter=forge)
    assert not result.ok and result.failed_site == 2
    assert "'global_0' from " in result.message and text in result.message
    log = result.log_paths[1].read_text()
    assert "ERROR at this site: refused" in log
    # The model in the forged message was never loaded: site 2 stopped before local training.
    assert "state: local_train" not in log
    assert error_message(result, 2).startswith(short)


def test_sys_exit_in_a_model_file_puts_that_site_into_error(tmp_path):
    clients = [make_client(tmp_path / "c1", SAMPLE_CLIENTS[0]),
               make_client(tmp_path / "c2", SAMPLE_CLIENTS[1], {"mnist_model.py": "import sys\nsys.exit(3)\n"}),
               make_client(tmp_path / "c3", SAMPLE_CLIENTS[2])]
    started = time.monotonic()
    result = run_app(tmp_path, clients)
    assert not result.ok and result.failed_site == 2
    assert result.message == "client_2: reported state error: sys.exit(3) in mnist_model.py"
    assert "importing it raised sys.exit(3)" in result.log_paths[1].read_text()
    assert time.monotonic() - started < 40


HANGING_FORWARD = (SAMPLE_CLIENTS[0].parent / "generic" / "mnist_model.py").read_text().replace(
    "    def forward(self, x: torch.Tensor) -> torch.Tensor:\n",
    "    def forward(self, x: torch.Tensor) -> torch.Tensor:\n        while True:\n            pass\n")


def test_a_forward_that_hangs_is_stopped_by_the_watchdog(tmp_path, monkeypatch):
    assert "while True" in HANGING_FORWARD
    monkeypatch.setenv("FC_WATCHDOG_SECONDS", "6")
    clients = [make_client(tmp_path / "c1", SAMPLE_CLIENTS[0]),
               make_client(tmp_path / "c2", SAMPLE_CLIENTS[1], {"mnist_model.py": HANGING_FORWARD}),
               make_client(tmp_path / "c3", SAMPLE_CLIENTS[2])]
    started = time.monotonic()
    result = run_app(tmp_path, clients)
    assert not result.ok and result.failed_site == 2
    line = HANGING_FORWARD.splitlines().index("        while True:") + 1
    assert result.message in [f"client_2: reported state error: state initial hung >6s "
                              f"mnist_model.py:{n}" for n in (line, line + 1)]
    assert "state initial did not finish within 6 s" in result.log_paths[1].read_text()
    assert time.monotonic() - started < 45
