"""The live status page over HTTP from running sites, during a real (short) testbed run."""
import json
import re
import shutil
import threading
import urllib.error
import urllib.request

import pytest
import yaml

import torch

import testbed
from tests.e2e_helpers import SAMPLE, SAMPLE_CLIENTS

MAX_ITER = 2
# A slice of each sample site: the page is under test, not the training.
TRAIN_SAMPLES, TEST_SAMPLES = 320, 80
POLL_INTERVAL_S = 0.1
HTTP_TIMEOUT_S = 5.0
RUN_STATES = {"initial", "local_train", "aggregate", "quantize", "write_results"}
SHOWN_STATE = re.compile(r"<dt>State</dt><dd>([^<]*)</dd>")
SHOWN_ROUND = re.compile(r"round (\d+) of (\d+)")


def small_client_dirs(tmp_path, n_sites=2):
    """The first samples of the first sample sites, as client dirs."""
    client_dirs = []
    for source in SAMPLE_CLIENTS[:n_sites]:
        target = tmp_path / source.name
        target.mkdir()
        for name, count in (("train_dataset.pth", TRAIN_SAMPLES), ("test_dataset.pth", TEST_SAMPLES)):
            inputs, labels = torch.load(source / name, weights_only=True)
            torch.save((inputs[:count].clone(), labels[:count].clone()), target / name)
        client_dirs.append(target)
    (client_dirs[0] / "slow.txt").write_text("the coordinator trains slowly")
    return client_dirs


# The coordinator's rounds last a second, so that the poller sees it in local_train and the
# other site waiting in aggregate, however fast the machine is.
SLOW_TRAIN = """
import os, time
from training import train as default_train

def train(model, train_loader, epochs, learning_rate):
    if os.path.exists(os.path.join(os.environ["FC_INPUT_DIR"], "slow.txt")):
        time.sleep(1.0)
    return default_train(model, train_loader, epochs, learning_rate)
"""


def short_generic_dir(tmp_path):
    """The sample's generic dir with a config that keeps the run short."""
    generic = tmp_path / "generic"
    shutil.copytree(SAMPLE / "generic", generic)
    (generic / "slow_train.py").write_text(SLOW_TRAIN)
    config_file = generic / "config.yml"
    config = yaml.safe_load(config_file.read_text())
    config["fc_quantization"].update(max_iter=MAX_ITER, epochs=1, train_function="slow_train.py")
    config_file.write_text(yaml.safe_dump(config))
    return generic


class PagePoller:
    """Fetches /web/ and /web/status.json of every site from a thread until stopped."""

    def __init__(self):
        self.snapshots = []  # (site index 0-based, status dict, page html, page content type)
        self.stop_event = threading.Event()
        self.thread = None

    def fetch_once(self, ports):
        """Every site's page after the run, before the testbed stops the sites."""
        for index, port in enumerate(ports):
            snapshot = self._fetch(port)
            if snapshot is not None:
                self.snapshots.append((index, *snapshot))

    def start(self, ports):
        self.thread = threading.Thread(target=self._poll, args=(ports,), daemon=True)
        self.thread.start()

    def stop(self):
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def _poll(self, ports):
        while not self.stop_event.is_set():
            for index, port in enumerate(ports):
                snapshot = self._fetch(port)
                if snapshot is not None:
                    self.snapshots.append((index, *snapshot))
            self.stop_event.wait(POLL_INTERVAL_S)

    @staticmethod
    def _fetch(port):
        base = f"http://127.0.0.1:{port}/web"
        try:
            with urllib.request.urlopen(f"{base}/status.json", timeout=HTTP_TIMEOUT_S) as response:
                status = json.loads(response.read())
            with urllib.request.urlopen(f"{base}/", timeout=HTTP_TIMEOUT_S) as response:
                content_type = response.headers.get_content_type()
                html = response.read().decode("utf-8")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None  # the site is stopping at the end of the run
        return status, html, content_type


@pytest.fixture(scope="module")
def polled_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("live_page")
    poller = PagePoller()
    try:
        result = testbed.run_federation(small_client_dirs(tmp_path), short_generic_dir(tmp_path), tmp_path / "out",
                                        quiet=True, timeout=300, on_started=poller.start,
                                        on_finished=poller.fetch_once)
    finally:
        poller.stop()
    assert result.ok, result.message
    return poller.snapshots


def test_status_json_shows_state_round_and_max_iter_while_running(polled_run):
    running = [status for _, status, *_ in polled_run if status.get("state") in RUN_STATES]
    assert running, "no snapshot caught a site in a running state"
    for status in running:
        if status["state"] == "initial" and "max_iter" not in status:
            continue  # `initial` has not read config.yml yet
        assert status["max_iter"] == MAX_ITER
        assert 0 <= status["round"] <= MAX_ITER
    assert {status["state"] for status in running} >= {"local_train", "aggregate"}
    assert {status.get("round") for status in running} >= {1, MAX_ITER}


def test_status_json_names_the_coordinator(polled_run):
    coordinator_flags = {index: status.get("coordinator") for index, status, *_ in polled_run
                         if "coordinator" in status}
    assert coordinator_flags == {0: True, 1: False}


def test_page_is_html_and_shows_the_state_and_round_k_of_n_while_running(polled_run):
    # Read from the page itself: the site may move on between the JSON and the page fetch.
    running_pages = [html for *_, html, _ in polled_run if 'http-equiv="refresh"' in html]
    assert {content_type for *_, content_type in polled_run} == {"text/html"}
    shown_states = {state for html in running_pages for state in SHOWN_STATE.findall(html)}
    shown_rounds = {tuple(map(int, pair)) for html in running_pages for pair in SHOWN_ROUND.findall(html)}
    assert shown_states >= {"local_train", "aggregate"}
    assert shown_states <= RUN_STATES
    assert {(k, MAX_ITER) for k in range(1, MAX_ITER + 1)} <= shown_rounds
    assert {n for _, n in shown_rounds} == {MAX_ITER}


def test_page_rounds_never_go_backwards(polled_run):
    for site in (0, 1):
        rounds = [status["round"] for index, status, *_ in polled_run if index == site and "round" in status]
        assert rounds == sorted(rounds)


def test_finished_site_shows_the_fp32_int8_table_and_stops_refreshing(polled_run):
    finished = [(status, html) for _, status, html, _ in polled_run if status.get("finished")]
    assert len(finished) >= 2, "every site's page shows it finished before the testbed stops it"
    for status, html in finished:
        assert "fp32 vs int8" in html
        assert 'http-equiv="refresh"' not in html
        site_int8 = status["results"]["site"]["int8"]["accuracy"]
        assert f"{100 * site_int8:.2f} %" in html
