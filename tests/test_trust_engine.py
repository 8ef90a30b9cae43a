"""federation/engine.py's guard, in-process on a fresh engine App: who may send what, setup
once, bounded bodies and JSON, BaseException from user code, and the watchdog.

Each test asserts the message the controller would see (at most 40 characters)."""
import html
import io
import json
import threading
import time
import wsgiref.util

import bottle
import FeatureCloud.app.engine.app as fc_engine
import pytest
import torch

from federation import engine
from inputs.errors import UserCodeError
from inputs.model_file import load_model
from inputs.train_function import call_train_function

pytestmark = pytest.mark.timeout(30)

IDS = ["a" * 16, "b" * 16, "c" * 16]  # the coordinator first, as the testbed does
STRANGER = "9" * 16


SITES = []  # every Site a test made: their state threads are stopped after the test


@pytest.fixture(autouse=True)
def stop_state_threads():
    """A state thread still waiting in engine.receive would keep the test process from
    exiting (it is not a daemon thread): fail its site, which ends the wait."""
    yield
    for site in SITES:
        engine.guard_of(site.app).failure = "test over"
    SITES.clear()


@pytest.fixture(autouse=True)
def quiet_engine(monkeypatch):
    """Short engine sleeps and globals restored after each test."""
    monkeypatch.setattr(fc_engine, "DATA_POLL_INTERVAL", 0.01)
    monkeypatch.setattr(fc_engine, "TRANSITION_WAIT", 0.01)
    monkeypatch.setattr(fc_engine, "TERMINAL_WAIT", 0.01)
    monkeypatch.setattr(fc_engine, "_serialize_outgoing", fc_engine._serialize_outgoing)
    monkeypatch.setattr(fc_engine, "_deserialize_incoming", fc_engine._deserialize_incoming)
    monkeypatch.setattr(engine, "_installed_app", None)
    monkeypatch.setattr(engine, "SETUP_WAIT_S", 0.0)


class Site:
    """A fresh engine App with one state, `run(state)`, behind the controller's three calls."""

    def __init__(self, run, expect=True):
        self.app = app = fc_engine.App()
        self.results = []
        SITES.append(self)

        @fc_engine.app_state("initial", fc_engine.Role.BOTH, app)
        class Initial(fc_engine.AppState):
            def register(self):
                self.register_transition("terminal", fc_engine.Role.BOTH)

            def run(state):
                run(state, self)
                return "terminal"

        app.register()
        engine.install(app=app)
        if expect:
            engine.expect_messages(to_coordinator=[r"update_\d+"], from_coordinator=[r"global_\d+"],
                                   app=app)
        self.server = bottle.Bottle()
        self.server.post("/setup", callback=lambda: engine._ctrl_setup(app))
        self.server.post("/data", callback=lambda: engine._ctrl_data_in(app))
        self.server.get("/status", callback=lambda: app.handle_status())

    def call(self, method, path, query="", body=b"", json_body=None):
        content_type = "application/octet-stream"
        if json_body is not None:
            body, content_type = json.dumps(json_body).encode(), "application/json"
        environ = {}
        wsgiref.util.setup_testing_defaults(environ)
        environ.update({"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
                        "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": content_type,
                        "wsgi.input": io.BytesIO(body)})
        answer = {}

        def start_response(status, headers, exc_info=None):
            answer["code"] = int(status.split()[0])

        text = b"".join(self.server(environ, start_response)).decode()
        return answer["code"], html.unescape(text)

    def setup(self, index=0):
        return self.call("POST", "/setup", json_body={
            "id": IDS[index], "coordinator": index == 0, "clients": IDS, "coordinatorID": IDS[0]})

    def post(self, sender, memo, body=b"x"):
        return self.call("POST", "/data", query=f"client={sender}&memo={memo}", body=body)

    def status(self):
        return json.loads(self.call("GET", "/status")[1])

    def wait_for_error(self, timeout=5.0):
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            status = self.status()
            if status["state"] == "error":
                return status
            time.sleep(0.02)
        raise AssertionError(f"no error state; last status {status}")


def gather_updates(state, site):
    site.results.append(engine.receive(state, "update_1", n=len(state.clients)))


def wait_forever(state, site):
    engine.receive(state, "never", n=1)


# ---------------------------------------------------------------- setup and sender identity

def test_data_before_setup_is_refused_and_not_stored():
    site = Site(wait_forever)
    code, text = site.post(IDS[1], "update_1")
    assert code == 409 and "data before setup" in text
    assert site.app.data_incoming == {}


def test_setup_is_accepted_once():
    site = Site(wait_forever)
    assert site.setup()[0] == 200
    thread = site.app.thread
    assert site.setup()[0] == 200  # the same setup again (a retry): answered, nothing started
    other = {"id": IDS[0], "coordinator": True, "clients": IDS[:2], "coordinatorID": IDS[0]}
    code, text = site.call("POST", "/setup", json_body=other)
    assert code == 409 and "accepts /setup once" in text
    assert site.app.thread is thread and site.app.clients == IDS
    assert sum(t is thread for t in threading.enumerate()) == 1


@pytest.mark.parametrize("body, text", [
    ({"id": IDS[0], "coordinator": True, "clients": IDS[1:], "coordinatorID": IDS[0]}, "'id' is not in"),
    ({"id": IDS[1], "coordinator": False, "clients": IDS, "coordinatorID": STRANGER}, "coordinatorID"),
    ({"id": IDS[0], "coordinator": "yes", "clients": IDS, "coordinatorID": IDS[0]}, "true or false"),
])
def test_a_malformed_setup_is_refused(body, text):
    site = Site(wait_forever)
    code, answer = site.call("POST", "/setup", json_body=body)
    assert code == 400 and text in answer
    assert site.app.thread is None


def coordinator_sends_its_update_then_gathers(state, site):
    state.send_data_to_coordinator(b"own", memo="update_1")
    gather_updates(state, site)


def test_updates_from_every_client_are_gathered():
    site = Site(coordinator_sends_its_update_then_gathers)
    site.setup()
    for sender in (IDS[2], IDS[1]):
        assert site.post(sender, "update_1", sender.encode())[0] == 200
    site.app.thread.join(timeout=5)
    (pieces,) = site.results
    assert [piece.sender for piece in pieces] == IDS
    assert site.status()["state"] != "error"


def test_a_duplicate_is_refused_naming_the_sender():
    site = Site(wait_forever)
    site.setup()
    assert site.post(IDS[2], "update_1")[0] == 200
    code, text = site.post(IDS[2], "update_1")
    assert code == 409 and "second payload under memo 'update_1'" in text and "site 3 of 3" in text
    status = site.wait_for_error()
    assert status["message"] == "dup update_1 from #3 cccccccc"
    assert status["finished"] is True
    assert len(site.app.data_incoming["update_1"]) == 1  # the duplicate was not stored


def test_an_unknown_sender_is_refused():
    site = Site(wait_forever)
    site.setup()
    code, text = site.post(STRANGER, "update_1")
    assert code == 409 and "not a client of this run" in text
    assert site.wait_for_error()["message"] == "refused update_1 from unknown 99999999"
    assert "update_1" not in site.app.data_incoming


def test_an_unexpected_memo_is_refused():
    site = Site(wait_forever)
    site.setup()
    code, text = site.post(IDS[1], "surprise")
    assert code == 409 and "this app sends no such message" in text
    assert site.wait_for_error()["message"] == "bad memo surprise from #2 bbbbbbbb"


def test_a_participant_takes_messages_only_from_the_coordinator():
    site = Site(wait_forever)
    site.setup(index=1)
    code, text = site.post(IDS[2], "global_1")  # a participant posing as the coordinator
    assert code == 409 and "only from the coordinator" in text
    assert site.wait_for_error()["message"] == "not coord: global_1 from #3 cccccccc"


def test_only_the_coordinator_sends_a_global_model():
    site = Site(wait_forever)
    site.setup()
    code, text = site.post(IDS[1], "global_1")
    assert code == 409 and "only the coordinator sends it" in text
    assert site.wait_for_error()["message"] == "bad memo global_1 from #2 bbbbbbbb"


def test_an_oversized_body_is_refused_before_it_is_stored():
    site = Site(wait_forever)
    site.setup()
    engine.limit_payload_bytes(2**20, app=site.app)
    code, text = site.post(IDS[1], "update_1", b"x" * (3 * 2**20))
    assert code == 413 and "more than the 1048576 bytes" in text
    assert site.wait_for_error()["message"] == "3 MB update_1 from #2 bbbbbbbb"
    assert site.app.data_incoming == {}


def test_payload_limit_follows_the_model_size():
    tensors = {"w": torch.zeros(1000)}
    assert engine.payload_limit_for(tensors) == 2 * 4000 + 2**20


def test_receive_stops_when_the_site_has_failed():
    site = Site(wait_forever)
    site.setup()
    site.post(STRANGER, "update_1")
    site.app.thread.join(timeout=5)
    assert not site.app.thread.is_alive()


# ---------------------------------------------------------------- JSON from other sites

def test_json_metadata_is_bounded_in_depth_and_size():
    assert engine.parse_json('{"a": [1, {"b": "[[[[["}]}', IDS[1]) == {"a": [1, {"b": "[[[[["}]}
    with pytest.raises(engine.PeerError) as error:
        engine.parse_json("[" * 100_000 + "]" * 100_000, IDS[1])
    assert "nested 100000 levels deep; at most 32" in str(error.value)
    with pytest.raises(engine.PeerError) as error:
        engine.parse_json('"' + "x" * (2 * 2**20) + '"', IDS[1])
    assert "at most 1048576 are accepted" in str(error.value)
    assert error.value.short.startswith("metadata too big from ")


# ---------------------------------------------------------------- user code

def test_sys_exit_in_a_state_puts_the_site_into_error():
    def exits(state, site):
        raise SystemExit(3)

    site = Site(exits)
    site.setup()
    status = site.wait_for_error()
    assert status["message"] == "sys.exit(3)"
    assert "state" in status and status["finished"] is True


TRAIN_INTERRUPTED = "def train(model, train_loader, epochs, learning_rate):\n    raise KeyboardInterrupt\n"


def test_keyboard_interrupt_from_a_train_function_names_its_file(tmp_path):
    from inputs.train_function import load_train_function
    path = tmp_path / "my_train.py"
    path.write_text(TRAIN_INTERRUPTED)
    train = load_train_function(path)

    def trains(state, site):
        call_train_function(train, None, None, 1, 0.1)

    site = Site(trains)
    site.setup()
    assert site.wait_for_error()["message"] == "KeyboardInterrupt in my_train.py"


def test_sys_exit_while_importing_the_model_file(tmp_path):
    path = tmp_path / "model.py"
    path.write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(UserCodeError) as error:
        load_model(path)
    assert "importing it raised sys.exit(3)" in str(error.value)
    assert error.value.short == "sys.exit(3) in model.py"


HANGING_MODEL = """import torch
class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)
    def forward(self, x):
        while True:
            x = x + 0
"""


def test_a_forward_that_never_returns_is_stopped_by_the_watchdog(tmp_path):
    path = tmp_path / "hang_model.py"
    path.write_text(HANGING_MODEL)
    model = load_model(path)

    def trains(state, site):
        with engine.watchdog("local training", seconds=0.5, app=state._app):
            model(torch.zeros(1, 4))

    site = Site(trains)
    started = time.monotonic()
    site.setup()
    status = site.wait_for_error()
    assert status["message"] == "local training hung >0.5s hang_model.py"
    site.app.thread.join(timeout=5)
    assert not site.app.thread.is_alive()  # unwound, not left spinning
    assert time.monotonic() - started < 5
    assert "did not finish within 0.5 s" in str(engine.guard_of(site.app).failure)


def test_every_state_runs_under_a_watchdog_that_ignores_waiting_for_peers(tmp_path):
    path = tmp_path / "slow_model.py"
    path.write_text(HANGING_MODEL)
    model = load_model(path)

    def waits_then_hangs(state, site):
        state.send_data_to_coordinator(b"own", memo="update_1")
        gather_updates(state, site)  # waiting for the peers does not count
        model(torch.zeros(1, 4))

    site = Site(waits_then_hangs)
    engine.set_watchdog_seconds(0.5, app=site.app)
    site.setup()
    time.sleep(0.8)
    assert site.status()["state"] != "error"
    for sender in IDS[1:]:
        site.post(sender, "update_1")
    assert site.wait_for_error()["message"] == "state initial hung >0.5s slow_model.py:8"


def test_a_watchdog_is_quiet_when_the_phase_ends_in_time():
    app = fc_engine.App()
    engine.install(app=app)
    with engine.watchdog("evaluation", "model.py", seconds=0.3, app=app):
        time.sleep(0.05)
    time.sleep(0.5)
    assert engine.guard_of(app).failure is None


def test_blame_names_the_sender_within_40_characters():
    app = fc_engine.App()
    app.clients = IDS
    assert engine.blame(IDS[2], "bad update: NaN", app=app) == "bad update: NaN from #3 cccccccc"
    long = engine.blame(IDS[2], "bad update: NaN or infinite values in w/fc1.weight", app=app)
    assert len(long) == 40 and long.endswith("… from #3 cccccccc")
    assert engine.blame(STRANGER, "bad update", app=app) == "bad update from unknown 99999999"
    error = engine.PeerError(IDS[1], "update_2 has NaN in 'w/fc1.weight'", "bad update: NaN", app=app)
    assert engine.status_message(error) == "bad update: NaN from #2 bbbbbbbb"
    assert "site 2 of 3 (id bbbbbbbbbbbbbbbb)" in str(error)
