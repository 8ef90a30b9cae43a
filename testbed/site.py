"""One site of a local federation: its input/output dirs, its app process, its HTTP endpoint.

A site plays the part of one FeatureCloud container: its input dir is the client dir merged
with the generic dir, its app listens on a free local port and its log goes to a file.
"""
import html
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

# Generous for a local machine: a site that does not answer within this is "not responding".
HTTP_TIMEOUT_S = 30.0
# How long SIGTERM gets before SIGKILL when sites are stopped.
STOP_GRACE_S = 2.0
LOG_TAIL_LINES = 40
# The sites share this machine's cores: each site's latency measurements wait for a lock on
# this file so that they are taken one site at a time (read by quant.timing, which is not
# imported here: it pulls in torch). An environment that sets it (e.g. several testbeds
# at once sharing one file) is kept.
LATENCY_LOCK_ENV = "FC_LATENCY_LOCK"
LATENCY_LOCK_FILE = "latency.lock"
# Where the sites' ports are drawn from (see free_ports), capped below the ephemeral range.
PRIVATE_PORT_RANGE = (20000, 32767)
EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
# Independent of the global `random` (seeded by tests and benchmarks): testbeds running at
# once must not draw the same sequence.
_PORT_CHOICE = random.SystemRandom()


# Runs each site's app: the site dies with the testbed, even when the testbed is SIGKILLed.
# PR_SET_PDEATHSIG kills it at once (a stopped process too); a thread that watches the parent
# id covers systems without prctl. Then the app runs as `python app.py` would run it.
SITE_BOOTSTRAP = r"""
import ctypes, os, runpy, signal, sys, threading, time
parent = int(os.environ.pop("FC_TESTBED_PARENT_PID"))
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != parent:  # the testbed died before prctl took effect
    os._exit(1)
def watch_parent():
    while os.getppid() == parent:
        time.sleep(0.5)
    os.killpg(0, signal.SIGKILL)
threading.Thread(target=watch_parent, name="testbed-parent-watch", daemon=True).start()
app = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(app))
runpy.run_path(app, run_name="__main__")
"""


class SiteFailure(Exception):
    """A site failed: errored, died, never came up or broke the protocol."""

    def __init__(self, site, message):
        super().__init__(f"{site.name}: {message}")
        self.site = site
        self.message = message


def free_ports(count):
    """count distinct ports nobody listens on right now.

    Drawn at random below the OS's ephemeral range: a site binds its port only once its app
    has imported torch (seconds later), and in that window any outgoing connection on this
    machine (the testbed's own status polls) may take an ephemeral port as its local end, while
    bind(0) may hand two sites of one run the same port (seen in CI: site 2's /setup reached
    site 1's app). Distinct within the run, checked free by binding each one.
    """
    low, high = PRIVATE_PORT_RANGE
    ephemeral_low = _ephemeral_port_low()
    if ephemeral_low is not None:
        high = min(high, ephemeral_low - 1)
    chosen = set()
    for port in _PORT_CHOICE.sample(range(low, high + 1), high + 1 - low):
        if port not in chosen and _can_bind(port):
            chosen.add(port)
            if len(chosen) == count:
                return sorted(chosen)
    raise RuntimeError(f"fewer than {count} free ports in {low}-{high}")


def _ephemeral_port_low():
    try:
        return int(Path(EPHEMERAL_RANGE_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _can_bind(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def merge_input_dir(client_dir, generic_dir, input_dir):
    """Copy the generic dir, then the client dir, into input_dir (client files win a clash)."""
    input_dir.mkdir(parents=True)
    if generic_dir is not None:
        shutil.copytree(generic_dir, input_dir, dirs_exist_ok=True)
    shutil.copytree(client_dir, input_dir, dirs_exist_ok=True)


class Site:
    """A site's files and process, and the three controller calls it answers."""

    def __init__(self, index, client_dir, work_dir, log_path, response_timeout=HTTP_TIMEOUT_S):
        self.index = index  # 1-based, as in client_<index>
        self.response_timeout = response_timeout
        self.name = f"client_{index}"
        self.client_dir = Path(client_dir)
        self.id = secrets.token_hex(8)  # 16 hex chars, like the controller's ids
        self.input_dir = Path(work_dir) / self.name / "input"
        self.output_dir = Path(work_dir) / self.name / "output"
        self.latency_lock = Path(work_dir) / LATENCY_LOCK_FILE  # shared by every site of the run
        self.log_path = Path(log_path)
        self.port = None
        self.process = None
        self.last_status = None
        self.finished = False

    # --- process -------------------------------------------------------------------------

    def start(self, app_path, generic_dir, threads, port):
        merge_input_dir(self.client_dir, generic_dir, self.input_dir)
        self.output_dir.mkdir(parents=True)
        self.port = port
        env = dict(os.environ)
        env.update(FC_PORT=str(self.port), FC_INPUT_DIR=str(self.input_dir),
                   FC_OUTPUT_DIR=str(self.output_dir), PYTHONUNBUFFERED="1",
                   FC_TESTBED_PARENT_PID=str(os.getpid()))
        # Short engine sleeps unless the caller asked for the real ones (FC_FAST_ENGINE=0).
        env.setdefault("FC_FAST_ENGINE", "1")
        env.setdefault(LATENCY_LOCK_ENV, str(self.latency_lock))
        # The sites share this machine's cores: without a cap each torch process starts one
        # thread per core and they slow each other down.
        env.setdefault("OMP_NUM_THREADS", str(threads))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            # Own session: stopping the site kills the whole process group it may spawn.
            self.process = subprocess.Popen(
                [sys.executable, "-c", SITE_BOOTSTRAP, str(app_path)],
                cwd=str(Path(app_path).parent), env=env,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)

    def exit_code(self):
        """None while the process runs, else its exit code."""
        return None if self.process is None else self.process.poll()

    def check_alive(self):
        code = self.exit_code()
        if code is not None and not self.finished:
            raise SiteFailure(self, f"process exited with code {code} before finishing")

    def is_stopped(self):
        """Whether the process is stopped (SIGSTOP, a debugger): state T in /proc."""
        if self.process is None:
            return False
        try:
            stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[-1].split()[:1] in (["T"], ["t"])

    def signal_group(self, signum):
        # Also when the leader is gone: processes it spawned may still hold the group.
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def group_alive(self):
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # the group id was reused by another user's process
            return False
        return True

    def log_tail(self, lines=LOG_TAIL_LINES):
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # --- controller calls ----------------------------------------------------------------

    def _url(self, path, query=None):
        url = f"http://127.0.0.1:{self.port}/api/{path}"
        return f"{url}?{urllib.parse.urlencode(query)}" if query else url

    def _call(self, method, path, body=None, query=None, content_type=None):
        request = urllib.request.Request(self._url(path, query), data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=self.response_timeout) as response:
            return response.read()

    def _call_or_fail(self, method, path, refused=None, **kwargs):
        try:
            return self._call(method, path, **kwargs)
        except urllib.error.HTTPError as error:
            # The site answered, and refused: its answer says why (e.g. who sent bad data).
            explanation = _error_body(error)
            self.check_alive()
            what = refused or f"{method} /{path}"
            raise SiteFailure(self, f"{what} refused (HTTP {error.code}): {explanation}") from error
        except (urllib.error.URLError, OSError) as error:
            if _is_timeout(error):
                raise self._not_responding(f"{method} /{path}") from error
            # A refused or reset connection often means the process is dying: give it a
            # moment to exit, because a dead process is the clearer message.
            try:
                self.process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
            self.check_alive()
            raise SiteFailure(self, f"{method} /{path} failed: {error}") from error

    def _not_responding(self, request):
        """The failure of a request that timed out: the site is named, and a stopped process too."""
        stopped = "; its process is stopped (SIGSTOP?)" if self.is_stopped() else ""
        return SiteFailure(self, f"site {self.index} not responding for "
                                 f"{self.response_timeout:g} s ({request} timed out{stopped})")

    def setup(self, coordinator, client_ids, wait_s, deadline):
        """POST /setup, retrying while the app's HTTP server is still coming up."""
        body = json.dumps({"id": self.id, "coordinator": coordinator,
                           "clients": client_ids, "coordinatorID": client_ids[0]}).encode()
        give_up = min(time.monotonic() + wait_s, deadline)
        while True:
            self.check_alive()
            try:
                self._call("POST", "setup", body=body, content_type="application/json")
                return
            except urllib.error.HTTPError as error:
                raise SiteFailure(self, f"POST /setup answered HTTP {error.code}: "
                                        f"{_error_body(error)}") from error
            except (urllib.error.URLError, OSError) as error:
                if _is_timeout(error):
                    raise self._not_responding("POST /setup") from error
                if time.monotonic() > give_up:
                    raise SiteFailure(
                        self, f"HTTP server on port {self.port} did not come up "
                              f"within {wait_s:.0f} s ({error})") from error
                time.sleep(0.1)

    def get_status(self):
        """GET /status. The body is JSON either way: a dict, or a pre-serialised JSON string."""
        body = self._call_or_fail("GET", "status")
        try:
            status = json.loads(body)
        except ValueError as error:
            raise SiteFailure(self, f"GET /status returned no JSON: {body[:200]!r}") from error
        if not isinstance(status, dict):
            raise SiteFailure(self, f"GET /status returned {type(status).__name__}, not an object")
        self.last_status = status
        return status

    def get_data(self):
        return self._call_or_fail("GET", "data")

    def post_data(self, payload, sender_id, memo, sender_name=None):
        # The engine stores the decoded query value and looks it up as quote(memo): send the
        # quoted memo, URL-encoded once more, so that lookup matches for any memo.
        query = {"client": sender_id, "memo": urllib.parse.quote(memo)}
        try:
            self._call_or_fail("POST", "data", body=payload, query=query,
                               content_type="application/octet-stream",
                               refused=f"{memo!r} from {sender_name or sender_id}")
        except SiteFailure as failure:
            if isinstance(failure.__cause__, urllib.error.HTTPError):
                self._record_status()  # the refusal put the site into state error: keep its message
            raise

    def _record_status(self):
        try:
            self.get_status()
        except SiteFailure:
            pass


def _is_timeout(error):
    reason = getattr(error, "reason", error)
    return isinstance(reason, TimeoutError) or isinstance(error, TimeoutError) \
        or "timed out" in str(reason)


def _error_body(error, limit=500):
    try:
        text = error.read().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - the code alone still says something
        text = ""
    # bottle wraps its error text in an HTML page: keep the <pre> part.
    if "<pre>" in text:
        text = text.split("<pre>", 1)[1].split("</pre>", 1)[0]
    text = html.unescape(" ".join(text.split()))
    return (text or str(error.reason))[:limit]


def stop_sites(sites):
    """SIGTERM every site's process group, then SIGKILL whatever outlives the grace period."""
    for site in sites:
        site.signal_group(signal.SIGTERM)
        site.signal_group(signal.SIGCONT)  # a stopped site handles SIGTERM only once continued
    give_up = time.monotonic() + STOP_GRACE_S
    for site in sites:
        if site.process is None:
            continue
        try:
            site.process.wait(timeout=max(0.0, give_up - time.monotonic()))
        except subprocess.TimeoutExpired:
            site.signal_group(signal.SIGKILL)
            site.process.wait(timeout=STOP_GRACE_S)
        _wait_for_group_exit(site, give_up)


def _wait_for_group_exit(site, give_up):
    # The leader's exit is not the site's: a process it spawned may still hold the group (and
    # an inherited listening socket); stopped means no process of the group is left. Bounded:
    # an unreaped zombie still counts as a member.
    killed = False
    while site.group_alive() and time.monotonic() < give_up + STOP_GRACE_S:
        if not killed and time.monotonic() > give_up:
            site.signal_group(signal.SIGKILL)
            killed = True
        time.sleep(0.02)
