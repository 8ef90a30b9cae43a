"""The thin wrapper over FeatureCloud's engine (FeatureCloud.app.engine.app).

We use the engine as it is (states, transitions, the controller API, send/broadcast with
memos) and change it where it falls short:

1. Serialization. The engine pickles what it sends and calls `pickle.loads` on every payload
   that arrives: a malicious peer or relay could run code on this site. We replace its two
   serialization hooks so that payloads are plain bytes both ways (our states send only
   `federation.payload` bytes and decode what arrives with `federation.payload.decode`, which
   executes nothing). The JSON path (SMPC/DP, `json.loads`) is safe and stays as it is.
2. Receiving. The engine's `gather_data`/`await_data` drop the id of the sending site; we need
   it to name a site whose update is bad, so `receive` reads the engine's incoming queue itself.
3. Who may send what (`Guard`). The engine stores whatever is POSTed to /data, under any memo,
   from anyone, even before setup, and starts a second state thread on a second /setup. We
   accept /setup once; refuse data before it; take at most one payload per sender and memo,
   only from a client of the setup's list, only a memo the app declared (`expect_messages`),
   and at a participant only from the coordinator; and we bound the body's size
   (`limit_payload_bytes`). A violation is refused (HTTP 4xx) and puts the site into state
   error with a message naming the sender: it is never silently counted or dropped.
4. Errors. On an exception the engine reports only its class name ("InputError") and catches
   `Exception` only: `sys.exit()` in user code ended the state thread while the site kept
   answering "running". Our run catches every `BaseException`, and the status message says
   what is wrong (within the engine's 40 characters); the log carries the whole explanation.
5. Hangs. `watchdog(phase, file, seconds)` turns a phase that runs too long into state error
   naming the phase and the file; every state runs under one (the time spent waiting for
   other sites in `receive` does not count), so a hang in user code never goes unnoticed.
6. Sleeps. The engine's waits are module constants tuned for the real controller; local runs
   (the testbed) shorten them. Production defaults stay as they are.
"""
import ctypes
import json
import os
import re
import sys
import threading
import time
import traceback
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import bottle
import FeatureCloud.app.engine.app as fc_engine

from federation.checks import PeerMessageError
from federation.payload import META_MAX_BYTES as METADATA_MAX_BYTES
from federation.payload import META_MAX_DEPTH as METADATA_MAX_DEPTH
from federation.payload import json_depth

_FAST_WAITS = {"DATA_POLL_INTERVAL": 0.02, "TRANSITION_WAIT": 0.02, "TERMINAL_WAIT": 1.0}
STATUS_MESSAGE_CHARS = 40  # what the controller shows of a status message

# Before the app knows its model's size (limit_payload_bytes), any body up to this is taken.
DEFAULT_PAYLOAD_LIMIT = 256 * 2**20
# A JSON document received from another site (payload metadata, a safetensors header).
# A phase of local work (loading, training a round, evaluating, ...) that runs longer than
# this is taken to hang; config key `watchdog_seconds`, environment FC_WATCHDOG_SECONDS.
DEFAULT_WATCHDOG_S = 3600.0
WATCHDOG_ENV = "FC_WATCHDOG_SECONDS"
_WATCHDOG_TICK_S = 0.1

_installed_app = None  # the engine's app once `install` ran: what watchdogs put into error


# ---------------------------------------------------------------- naming sites and errors

def _app_or_installed(app):
    return app if app is not None else (_installed_app or fc_engine.app)


def _printable(text, limit):
    text = "".join(c if c.isprintable() else "?" for c in str(text))
    return text if len(text) <= limit else text[:limit - 1] + "…"


def sender_label(sender, app=None):
    """A short name for a sending site: '#3 3f2a9c1e' (its 1-based position in the setup's
    client list and the first 8 characters of its id), or 'unknown 3f2a9c1e'."""
    clients = _app_or_installed(app).clients or []
    short_id = _printable(sender, 64)[:8] if sender is not None else "None"
    if sender in clients:
        return f"#{clients.index(sender) + 1} {short_id}"
    return f"unknown {short_id}"


def describe_sender(sender, app=None):
    """The long name of a sending site, for logs: 'site 3 of 5 (id 3f2a9c1e0a1b2c3d)'."""
    clients = _app_or_installed(app).clients or []
    if sender in clients:
        return f"site {clients.index(sender) + 1} of {len(clients)} (id {sender})"
    return f"unknown sender {_printable(sender, 40)!r} (not in this run's client list)"


def fit_message(problem, tail=""):
    """`problem` + `tail` in at most 40 characters; `tail` (e.g. ' from #3 3f2a9c1e') is kept
    whole and the problem is cut."""
    room = STATUS_MESSAGE_CHARS - len(tail)
    if len(problem) > room:
        problem = problem[:max(room - 1, 0)] + "…"
    return (problem + tail)[:STATUS_MESSAGE_CHARS]


def blame(sender, short_problem, app=None):
    """A status message naming the problem and its sender, e.g. blame(s, "bad update: NaN")
    -> 'bad update: NaN from #3 3f2a9c1e' (the problem is cut to fit 40 characters)."""
    return fit_message(short_problem, f" from {sender_label(sender, app)}")


class PeerError(Exception):
    """Another site sent something this site must refuse. `str()` is the whole explanation;
    `short` (at most 40 characters, for the controller) names the problem and the sender,
    e.g. 'bad update: NaN from #3 3f2a9c1e'."""

    http_status = 400

    def __init__(self, sender, problem, short, app=None):
        self.sender = sender
        self.problem = problem
        super().__init__(f"{problem} (from {describe_sender(sender, app)})")
        self.short = blame(sender, short, app)


class ProtocolError(PeerError):
    """A message that breaks the app's protocol: unknown sender, duplicate, unexpected memo."""

    http_status = 409


class PayloadTooLarge(PeerError):
    http_status = 413


class WatchdogTimeout(Exception):
    """A phase of local work ran longer than its watchdog allows."""

    def __init__(self, phase, file, seconds):
        self.phase, self.file, self.seconds = phase, file, seconds
        where = f"; it was running {file}" if file else ""
        super().__init__(f"{phase} did not finish within {seconds:g} s{where}: it hangs or is far "
                         f"too slow (raise watchdog_seconds in config.yml if it is only slow)")
        name = Path(file).name if file else ""
        tail = f" {name}" if name else ""
        if len(f"{phase} hung >{seconds:g}s{tail}") > STATUS_MESSAGE_CHARS:
            tail = tail.split(":")[0]  # without the line number
        self.short = fit_message(f"{phase} hung >{seconds:g}s", tail)


class _WatchdogUnwind(BaseException):
    """Raised asynchronously in a thread whose watchdog expired, to unwind it if it runs
    Python code. A BaseException, so that user code's `except Exception` does not keep it;
    `passthrough`: inputs/ re-raises it instead of blaming the user code it interrupted."""

    passthrough = True


class SiteFailed(Exception):
    """This site already failed (its status says why); the state thread stops here."""


def status_message(error):
    """At most 40 characters that tell a user what went wrong (a refused message from another
    site: the problem and the site, federation.checks.PeerMessageError)."""
    short = getattr(error, "short", None)
    if short is None and isinstance(error, PeerMessageError) and error.sender is not None:
        short = blame(error.sender, error.problem)
    return (short or f"{type(error).__name__}: {error}")[:STATUS_MESSAGE_CHARS]


def user_code_location(tb_or_frame):
    """'model.py:12' for the innermost frame of user code (a file imported by
    inputs.model_file.import_python_file) in a traceback or a frame's stack, else None."""
    frames = []
    if hasattr(tb_or_frame, "tb_frame"):
        tb = tb_or_frame
        while tb is not None:
            frames.append((tb.tb_frame, tb.tb_lineno))
            tb = tb.tb_next
        frames.reverse()  # innermost first
    else:
        frame = tb_or_frame
        while frame is not None:
            frames.append((frame, frame.f_lineno))
            frame = frame.f_back
    for frame, line in frames:
        if str(frame.f_globals.get("__name__", "")).startswith("fc_user_"):
            return f"{Path(frame.f_code.co_filename).name}:{line}"
    return None


class UserCodeExit(Exception):
    """User code raised SystemExit, KeyboardInterrupt or another BaseException that is not an
    Exception; without this the state thread would end silently."""

    def __init__(self, error, location):
        what = f"sys.exit({error.code!r})" if isinstance(error, SystemExit) else type(error).__name__
        where = f" in {location}" if location else ""
        super().__init__(f"user code raised {what}{where}; a site must not exit or be "
                         f"interrupted from inside the model, dataset or train function")
        self.short = fit_message(what, where)


# ---------------------------------------------------------------- the guard

@dataclass(frozen=True)
class Received:
    sender: str
    data: bytes


class Guard:
    """What this site accepts from the controller, and its failure once it has failed."""

    def __init__(self, app):
        self.app = app
        self.lock = threading.RLock()
        self.setup = None             # the accepted /setup body
        self.payload_limit = DEFAULT_PAYLOAD_LIMIT
        self.seen = set()             # (memo as stored, sender) of every payload taken
        self.to_coordinator = None    # compiled memo patterns; None: any memo
        self.from_coordinator = None
        self.failure = None           # the first error; the site is in state error from then on
        self.on_error = lambda error: None
        self.watchdog_seconds = None  # None: FC_WATCHDOG_SECONDS or DEFAULT_WATCHDOG_S

    # --- failing ---------------------------------------------------------------------------

    def fail(self, error):
        """Put the site into state error for `error` (the first failure wins); True if this
        call did it."""
        with self.lock:
            if self.failure is not None:
                return False
            self.failure = error
        message = status_message(error)
        app = self.app
        app.status_message, app.status_state, app.status_finished = message, "error", True
        app.status_available = False
        print(f"ERROR at this site: {error}", file=sys.stderr, flush=True)
        try:
            self.on_error(error)
        except Exception:  # noqa: BLE001 - reporting must not hide the error itself
            traceback.print_exc()
        return True

    def error_status(self):
        return self.app.get_current_status(available=False, finished=True,
                                           state=fc_engine.State.ERROR.value,
                                           message=status_message(self.failure))

    def check_alive(self):
        if self.failure is not None:
            raise SiteFailed(f"this site already failed: {self.failure}")

    # --- incoming data ---------------------------------------------------------------------

    def check_incoming(self, client, memo, size):
        """The error for a payload of `size` bytes from `client` under `memo`, or None.
        Records it as seen when it is accepted."""
        app = self.app
        clients = app.clients or []
        shown_memo = _printable(urllib.parse.unquote(memo) if memo else memo, 14)
        if client not in clients:
            return ProtocolError(client, f"refused data under memo {shown_memo!r}: the sender "
                                 f"is not a client of this run", f"refused {shown_memo}", app)
        if size is not None and size > self.payload_limit:
            return PayloadTooLarge(client, f"refused a {size} byte payload under memo "
                                   f"{shown_memo!r}: more than the {self.payload_limit} bytes "
                                   f"this app takes", f"{_megabytes(size)} {shown_memo}", app)
        from_coordinator = client == app.coordinatorID
        if not app.coordinator and not from_coordinator:
            return ProtocolError(client, f"refused {shown_memo!r}: a participant takes messages "
                                 f"only from the coordinator", f"not coord: {shown_memo}", app)
        problem = self._memo_problem(memo, from_coordinator, client)
        if problem:
            return ProtocolError(client, f"refused memo {shown_memo!r}: {problem}",
                                 f"bad memo {shown_memo}", app)
        with self.lock:
            if (memo, client) in self.seen:
                return ProtocolError(client, f"refused a second payload under memo {shown_memo!r}: "
                                     f"each site sends one per memo", f"dup {shown_memo}", app)
            self.seen.add((memo, client))
        return None

    def _memo_problem(self, memo, from_coordinator, client):
        if self.to_coordinator is None and self.from_coordinator is None:
            return None
        plain = urllib.parse.unquote(memo) if memo is not None else "None"
        if any(pattern.fullmatch(plain) for pattern in self.from_coordinator or ()):
            if not from_coordinator:
                return "only the coordinator sends it"
            return None
        if any(pattern.fullmatch(plain) for pattern in self.to_coordinator or ()):
            if not self.app.coordinator:
                return "it goes to the coordinator, and this site is a participant"
            return None
        return "this app sends no such message"


def _megabytes(size):
    return f"{size / 2**20:.0f} MB" if size >= 2**20 else f"{size} B"


def guard_of(app=None):
    app = _app_or_installed(app)
    guard = app.__dict__.get("_fc_guard")
    if guard is None:
        guard = app.__dict__["_fc_guard"] = Guard(app)
    return guard


def limit_payload_bytes(n, app=None):
    """Refuse any payload above `n` bytes from now on (call it once the model is known, e.g.
    with `payload_limit_for(site.update_tensors())`)."""
    guard_of(app).payload_limit = int(n)


def payload_limit_for(tensors, factor=2, margin=2**20):
    """A generous bound for one message carrying (at most) these tensors, e.g. a model's update:
    `factor` times their bytes plus `margin` for the header and metadata."""
    return factor * sum(t.numel() * t.element_size() for t in tensors.values()) + margin


def expect_messages(to_coordinator=(), from_coordinator=(), app=None):
    """Declare the app's memos (regular expressions, matched in full, e.g. r"update_\\d+"):
    `to_coordinator` ones are sent by every site to the coordinator, `from_coordinator` ones
    only by the coordinator. Any other memo is refused naming its sender."""
    guard = guard_of(app)
    guard.to_coordinator = [re.compile(p) for p in to_coordinator]
    guard.from_coordinator = [re.compile(p) for p in from_coordinator]


# ---------------------------------------------------------------- JSON from other sites

def parse_json(text, sender, what="metadata", max_bytes=METADATA_MAX_BYTES,
               max_depth=METADATA_MAX_DEPTH):
    """json.loads for a document another site sent, bounded in size and nesting depth first
    (a deep document would otherwise raise RecursionError, a huge one take the memory).
    PeerError names the sender."""
    if isinstance(text, (bytes, bytearray)):
        size = len(text)
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise PeerError(sender, f"{what} is not UTF-8 text", f"bad {what}") from None
    else:
        text = str(text)
        size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise PeerError(sender, f"{what} is {size} bytes; at most {max_bytes} are accepted",
                        f"{what} too big")
    depth = json_depth(text)
    if depth > max_depth:
        raise PeerError(sender, f"{what} is nested {depth} levels deep; at most {max_depth} are "
                        f"accepted", f"{what} too deep")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        raise PeerError(sender, f"{what} is not valid JSON: {_printable(error, 120)}",
                        f"bad {what}") from None


# ---------------------------------------------------------------- the controller's endpoints

def _setup_body():
    try:
        body = bottle.request.json
    except Exception:  # noqa: BLE001 - any parse failure is the caller's mistake
        body = None
    if not isinstance(body, dict):
        raise bottle.HTTPError(400, "setup: expected a JSON object {id, coordinator, clients, coordinatorID}")
    client_id, clients = body.get("id"), body.get("clients")
    coordinator, coordinator_id = body.get("coordinator"), body.get("coordinatorID")
    if not (isinstance(clients, list) and clients and all(isinstance(c, str) for c in clients)
            and len(set(clients)) == len(clients)):
        raise bottle.HTTPError(400, "setup: 'clients' must be a list of distinct client ids")
    if client_id not in clients:
        raise bottle.HTTPError(400, "setup: 'id' is not in 'clients'")
    if not isinstance(coordinator, bool):
        raise bottle.HTTPError(400, "setup: 'coordinator' must be true or false")
    if coordinator_id is None and coordinator:
        coordinator_id = client_id
    if coordinator_id not in clients or (coordinator and coordinator_id != client_id) \
            or (not coordinator and coordinator_id == client_id):
        raise bottle.HTTPError(400, "setup: 'coordinatorID' must name the coordinator, one of 'clients'")
    return {"id": client_id, "coordinator": coordinator, "clients": list(clients),
            "coordinatorID": coordinator_id}


SETUP_WAIT_S = 1.0  # the engine's sleep before it answers /setup


def _ctrl_setup(app):
    time.sleep(SETUP_WAIT_S)
    body = _setup_body()
    guard = guard_of(app)
    with guard.lock:
        if guard.setup is not None:
            if body == guard.setup:
                return ""  # the controller retried a setup whose answer it missed
            raise bottle.HTTPError(409, "setup: this site is already set up (with other clients); "
                                        "it accepts /setup once")
        guard.setup = body
    app.handle_setup(body["id"], body["coordinator"], body["clients"], body["coordinatorID"])
    return ""


def _ctrl_data_in(app):
    guard = guard_of(app)
    if guard.setup is None:
        raise bottle.HTTPError(409, "data before setup: POST /setup first")
    request = bottle.request
    client = request.query.get("client")
    memo = request.query.get("memo")  # kept URL-encoded, as the engine does
    length = request.content_length
    if length < 0:
        raise bottle.HTTPError(411, "POST /data needs a Content-Length")
    error = guard.check_incoming(client, memo, length)
    if error is None:
        data = request.body.read()
        if len(data) != length:
            error = PeerError(client, f"the body under memo {memo!r} is {len(data)} bytes, its "
                              f"Content-Length says {length}", "bad body", app)
        else:
            app.handle_incoming(data, client, memo=memo)
            return ""
    guard.fail(error)
    raise bottle.HTTPError(error.http_status, str(error))


def _handle_incoming_checked(app, original):
    """The engine's handle_incoming for sends to itself (coordinator, send_to_self): the same
    rules as for POSTed data, raised in the state thread."""
    def handle_incoming(data, client, memo=None):
        if _in_state_thread(app):  # POSTed data was checked by _ctrl_data_in
            error = guard_of(app).check_incoming(client, memo, None)
            if error is not None:
                raise error
        return original(data, client, memo=memo)
    return handle_incoming


def _in_state_thread(app):
    return threading.current_thread() is app.thread


def _handle_status_guarded(app, original):
    def handle_status():
        guard = guard_of(app)
        if guard.failure is not None:
            return guard.error_status()
        return original()
    return handle_status


def _replace_routes(app):
    from FeatureCloud.app.api.http_ctrl import api_server
    for route in api_server.routes:
        if route.method == "POST" and route.rule.endswith("/setup"):
            route.callback = lambda: _ctrl_setup(app)
        elif route.method == "POST" and route.rule.endswith("/data"):
            route.callback = lambda: _ctrl_data_in(app)
        else:
            continue
        route.reset()


# ---------------------------------------------------------------- running the states

def _serialize_outgoing(data, is_json=False):
    if is_json:
        return json.dumps(data, cls=fc_engine._NumpyArrayEncoder)
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"only encoded payloads (bytes) may be sent, got {type(data).__name__}")
    return bytes(data)


def _deserialize_incoming(data, is_json=False):
    return json.loads(data) if is_json else data


def _guarded_run(app):
    # The engine's own guarded_run, for every BaseException, with a message that says what is wrong.
    guard = guard_of(app)
    try:
        app.run()
    except BaseException as error:  # noqa: BLE001 - every failure must reach the controller
        if isinstance(error, _WatchdogUnwind) or (isinstance(error, SiteFailed) and guard.failure):
            app.log(f"state thread stopped: {guard.failure}")
            return
        app.log(traceback.format_exc())
        if not isinstance(error, Exception):
            error = UserCodeExit(error, user_code_location(error.__traceback__))
        guard.fail(error)


def _watched_state_run(state):
    run = state.run

    def watched():
        with watchdog(f"state {state.name}", app=state._app):
            return run()
    return watched


def install(fast=False, on_error=lambda error: None, app=None):
    """Make the engine pickle-free, guarded and its errors explicit (`on_error` hears of them
    too); with `fast`, shorten its sleeps. Call it after the states are registered."""
    global _installed_app
    app = app if app is not None else fc_engine.app
    _installed_app = app
    guard = guard_of(app)
    guard.on_error = on_error
    fc_engine._serialize_outgoing = _serialize_outgoing
    fc_engine._deserialize_incoming = _deserialize_incoming
    app.guarded_run = lambda: _guarded_run(app)
    app.handle_status = _handle_status_guarded(app, type(app).handle_status.__get__(app))
    app.handle_incoming = _handle_incoming_checked(app, type(app).handle_incoming.__get__(app))
    for state in app.states.values():
        if not getattr(state.run, "_fc_watched", False):
            state.run = _watched_state_run(state)
            state.run._fc_watched = True
    if app is fc_engine.app:
        _replace_routes(app)
    if fast:
        for name, seconds in _FAST_WAITS.items():
            setattr(fc_engine, name, seconds)


def receive(state, memo, n, senders=None):
    """Wait for `n` payloads sent under `memo`; return them ordered by the senders' position in
    the client list, so that every run combines them in the same order.

    The senders must be `senders` when given; else, when `n` is the number of clients, every
    client once, and for one payload at a participant, the coordinator. The wait does not
    count against the state's watchdog; it ends when the site has failed (SiteFailed)."""
    app = state._app
    guard = guard_of(app)
    key = urllib.parse.quote(memo)  # the controller delivers memos URL-quoted
    with _watchdog_paused():
        while len(app.data_incoming.get(key, [])) < n:
            guard.check_alive()
            time.sleep(fc_engine.DATA_POLL_INTERVAL)
    guard.check_alive()
    pieces = app.data_incoming.pop(key)
    if len(pieces) > n:
        extra = pieces[n][1]
        raise ProtocolError(extra, f"expected {n} payloads under memo '{memo}', got {len(pieces)}",
                            f"extra {memo}", app)
    if senders is None:
        if n == len(app.clients):
            senders = app.clients
        elif n == 1:
            senders = [app.coordinatorID]
    received = [Received(sender=client, data=data) for data, client in pieces]
    if senders is not None:
        _check_senders(app, memo, received, senders)
    order = {client: index for index, client in enumerate(app.clients)}
    return sorted(received, key=lambda piece: order.get(piece.sender, len(order)))


def _check_senders(app, memo, received, senders):
    seen = set()
    for piece in received:
        if piece.sender not in senders:
            raise ProtocolError(piece.sender, f"message '{memo}' from a site that does not send it",
                                f"{memo} not expected", app)
        if piece.sender in seen:
            raise ProtocolError(piece.sender, f"two messages '{memo}' from one site", f"dup {memo}", app)
        seen.add(piece.sender)


# ---------------------------------------------------------------- watchdogs

class _Watch:
    def __init__(self, phase, file, seconds, app, paused=False):
        self.phase, self.file, self.seconds, self.app = phase, file, seconds, app
        self.paused = paused      # a wait for other sites: nothing is timed
        self.used = 0.0           # seconds used while on top of the stack
        self.armed_at = None      # monotonic time it became the top entry
        self.fired = False

    def limit(self):
        if self.seconds is not None:
            return float(self.seconds)
        guard = guard_of(self.app)
        if guard.watchdog_seconds is not None:
            return float(guard.watchdog_seconds)
        return float(os.environ.get(WATCHDOG_ENV) or DEFAULT_WATCHDOG_S)


_watch_lock = threading.Lock()
_watch_stacks = {}    # thread id -> [_Watch], innermost last; only the innermost is timed
_monitor = None


def set_watchdog_seconds(seconds, app=None):
    """The limit of every watchdog without its own `seconds` (each state runs under one);
    e.g. `engine.set_watchdog_seconds(site.config.watchdog_seconds)` once the config is read."""
    guard_of(app).watchdog_seconds = seconds


@contextmanager
def watchdog(phase, file=None, seconds=None, app=None):
    """Run the block as phase `phase` (e.g. "local training") of user code in `file` (e.g. the
    model file; None: the innermost user file running when it expires). If it runs longer
    than `seconds` (None: `set_watchdog_seconds`, FC_WATCHDOG_SECONDS or 3600 s), the site
    goes into state error, "hang: local training >60s model.py", and the block is interrupted
    where it runs Python code. Time spent inside `receive` (waiting for other sites) and in
    nested watchdogs does not count against it."""
    watch = _Watch(phase, None if file is None else str(file), seconds, _app_or_installed(app))
    _push(watch)
    try:
        yield watch
    finally:
        _pop(watch)


@contextmanager
def _watchdog_paused():
    watch = _Watch("waiting", None, None, _app_or_installed(None), paused=True)
    _push(watch)
    try:
        yield
    finally:
        _pop(watch)


def _push(watch):
    global _monitor
    now = time.monotonic()
    with _watch_lock:
        stack = _watch_stacks.setdefault(threading.get_ident(), [])
        if stack and stack[-1].armed_at is not None:
            stack[-1].used += now - stack[-1].armed_at
            stack[-1].armed_at = None
        watch.armed_at = now
        stack.append(watch)
        if _monitor is None or not _monitor.is_alive():
            _monitor = threading.Thread(target=_monitor_loop, name="fc-watchdog", daemon=True)
            _monitor.start()


def _pop(watch):
    now = time.monotonic()
    with _watch_lock:
        ident = threading.get_ident()
        stack = _watch_stacks.get(ident, [])
        if watch in stack:
            stack.remove(watch)
        if stack:
            stack[-1].armed_at = now
        else:
            _watch_stacks.pop(ident, None)


def _monitor_loop():
    while True:
        time.sleep(_WATCHDOG_TICK_S)
        now = time.monotonic()
        expired = []
        with _watch_lock:
            for ident, stack in _watch_stacks.items():
                top = stack[-1] if stack else None
                if top is None or top.paused or top.fired or top.armed_at is None:
                    continue
                if top.used + now - top.armed_at >= top.limit():
                    top.fired = True
                    expired.append((ident, top))
        for ident, watch in expired:
            _expire(ident, watch)


def _expire(ident, watch):
    frame = sys._current_frames().get(ident)
    location = watch.file or (user_code_location(frame) if frame is not None else None)
    error = WatchdogTimeout(watch.phase, location, watch.limit())
    stack = "".join(traceback.format_stack(frame)) if frame is not None else ""
    print(f"watchdog: {error}\nwhere it runs:\n{stack}", file=sys.stderr, flush=True)
    guard_of(watch.app).fail(error)
    # Unwind the thread if it runs Python code (a loop in a forward); code blocked in C
    # stays blocked, but the site reports the error and the controller stops it.
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(_WatchdogUnwind))
