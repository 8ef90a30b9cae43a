"""The image's serving stack without Docker: server_config/ started on loopback ports,
supervisord running nginx and the real main.py, spoken to through nginx like the controller does."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from html import escape
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = REPO / "server_config" / "docker-entrypoint.sh"
APP_MAIN = REPO / "main.py"
STATUS_KEYS = {"available", "finished", "message", "progress", "state", "destination", "smpc", "dp", "memo"}
SITE_ID = "0123456789abcdef"
PAYLOAD_BYTES = 3 * 1024 * 1024    # above nginx's default 1 MB body limit, as model payloads are
STARTUP_SECONDS = 30
STOP_SECONDS = 15


@pytest.fixture(scope="session")
def serving_tools():
    """nginx and supervisord as the image has them: Debian's packages (tools/setup_system.sh)."""
    missing = [tool for tool in ("nginx", "supervisord") if not shutil.which(tool)]
    assert not missing, f"{missing} not on PATH: run tools/setup_system.sh (make test does)"


def free_loopback_ports(count: int) -> list:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def child_pids(pid: int) -> list:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in children.read_text().split()] if children.exists() else []


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


class Stack:
    """One supervisord started through the entrypoint, and how to reach and stop it."""

    def __init__(self, tmp_path: Path):
        api_port, web_port, app_port = free_loopback_ports(3)
        self.api_url, self.web_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{web_port}"
        self.log_path = tmp_path / "stack.log"
        for folder in ("input", "output", "run"):
            (tmp_path / folder).mkdir()
        env = {**os.environ, "FC_API_PORT": str(api_port), "FC_WEB_PORT": str(web_port), "FC_PORT": str(app_port),
               "FC_APP_DIR": str(REPO), "FC_APP_MAIN": str(APP_MAIN), "FC_PYTHON": sys.executable,
               "FC_RUN_DIR": str(tmp_path / "run"),
               "FC_INPUT_DIR": str(tmp_path / "input"), "FC_OUTPUT_DIR": str(tmp_path / "output")}
        with open(self.log_path, "wb") as log:
            self.supervisord = subprocess.Popen(["sh", str(ENTRYPOINT)], env=env, stdout=log,
                                                stderr=subprocess.STDOUT)
        self.children = []

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, url: str) -> requests.Response:
        """GET once the stack answers; nginx says 502 while the app is still booting."""
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            assert self.supervisord.poll() is None, f"supervisord exited early:\n{self.log()}"
            try:
                response = requests.get(url, timeout=5)
                if response.status_code == 200:
                    # Remembered while serving: supervisord's children are what stop() must see gone.
                    self.children = child_pids(self.supervisord.pid)
                    return response
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"GET {url} not answered in {STARTUP_SECONDS} s:\n{self.log()}"
            time.sleep(0.2)

    def terminate(self) -> None:
        """SIGTERM to supervisord, which stops nginx and the app before it exits itself."""
        if self.supervisord.poll() is None:
            self.children = self.children or child_pids(self.supervisord.pid)
            self.supervisord.send_signal(signal.SIGTERM)
            try:
                self.supervisord.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.supervisord.kill()
                self.supervisord.wait()

    def stop(self) -> None:
        """terminate(), then force whatever supervisord left behind: nothing may outlive a test."""
        self.terminate()
        for pid in self.children:
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def stack(serving_tools, tmp_path):
    assert APP_MAIN.exists(), f"{APP_MAIN} is missing: the stack runs the real app"
    running = Stack(tmp_path)
    try:
        yield running
    finally:
        running.stop()


def poll_json(stack: Stack, url: str, done, what: str) -> dict:
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        body = json.loads(stack.get(url).text)   # the engine may answer JSON served as text/html
        if done(body):
            return body
        assert time.monotonic() < deadline, f"{what} not seen in {STARTUP_SECONDS} s (last {body}):\n{stack.log()}"
        time.sleep(0.2)


def test_controller_and_browser_reach_the_app_through_nginx(stack):
    status = json.loads(stack.get(f"{stack.api_url}/status").text)
    assert STATUS_KEYS <= set(status), f"engine status keys missing: {STATUS_KEYS - set(status)}"
    assert status["finished"] is False

    setup = {"id": SITE_ID, "coordinator": True, "clients": [SITE_ID], "coordinatorID": SITE_ID}
    assert requests.post(f"{stack.api_url}/setup", json=setup, timeout=10).status_code == 200

    payload = os.urandom(PAYLOAD_BYTES)
    # A memo of the app's protocol from a client of the setup: any other is refused (issue 10).
    sent = requests.post(f"{stack.api_url}/data", params={"client": SITE_ID, "memo": "summary"}, data=payload, timeout=10)
    assert sent.status_code == 200, f"POST /data of {PAYLOAD_BYTES} bytes: {sent.status_code}"

    live = poll_json(stack, f"{stack.web_url}/status.json", lambda body: body.get("state"), "a state on the page")
    page = stack.get(f"{stack.web_url}/")
    assert page.headers["Content-Type"].startswith("text/html")
    assert escape(live["state"]) in page.text and SITE_ID in page.text

    # The input folder is empty, so the app must end in error, and the controller must see it.
    final = poll_json(stack, f"{stack.api_url}/status", lambda body: body["finished"], "finished status")
    assert final["state"] == "error"


def test_stopping_supervisord_stops_nginx_and_the_app(stack):
    stack.get(f"{stack.api_url}/status")
    assert len(stack.children) == 2, f"expected nginx and the app under supervisord, got {stack.children}"
    stack.terminate()
    assert stack.supervisord.returncode == 0, f"supervisord did not shut down cleanly:\n{stack.log()}"
    assert not [pid for pid in stack.children if is_running(pid)], "supervisord left children behind"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{stack.api_url}/status", timeout=2)
