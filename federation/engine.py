"""The thin wrapper over FeatureCloud's engine (FeatureCloud.app.engine.app).

We use the engine as it is (states, transitions, the controller API, send/broadcast with
memos) and change it in four places only, each because it falls short:

1. Serialization. The engine pickles what it sends and calls `pickle.loads` on every payload
   that arrives: a malicious peer or relay could run code on this site. We replace its two
   serialization hooks so that payloads are plain bytes both ways (our states send only
   `federation.payload` bytes and decode what arrives with `federation.payload.decode`, which
   executes nothing). The JSON path (SMPC/DP, `json.loads`) is safe and stays as it is.
2. Receiving. The engine's `gather_data`/`await_data` drop the id of the sending site; we need
   it to name a site whose update is bad, so `receive` reads the engine's incoming queue itself.
3. Errors. On an exception the engine reports only its class name ("InputError"); a user
   needs to know what is wrong. `install` wraps the run so that the status message says it
   (within the engine's 40 characters) and the log carries the whole explanation.
4. Sleeps. The engine's waits are module constants tuned for the real controller; local runs
   (the testbed) shorten them. Production defaults stay as they are.
"""
import json
import sys
import time
import traceback
import urllib.parse
from dataclasses import dataclass

import FeatureCloud.app.engine.app as fc_engine

_FAST_WAITS = {"DATA_POLL_INTERVAL": 0.02, "TRANSITION_WAIT": 0.02, "TERMINAL_WAIT": 1.0}


def _serialize_outgoing(data, is_json=False):
    if is_json:
        return json.dumps(data, cls=fc_engine._NumpyArrayEncoder)
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"only encoded payloads (bytes) may be sent, got {type(data).__name__}")
    return bytes(data)


def _deserialize_incoming(data, is_json=False):
    return json.loads(data) if is_json else data


def status_message(error):
    """At most 40 characters that tell a user what went wrong."""
    short = getattr(error, "short", None)
    return (short or f"{type(error).__name__}: {error}")[:40]


def _guarded_run(app, on_error):
    # The engine's own guarded_run, with a message that says what is wrong.
    try:
        app.run()
    except Exception as error:  # noqa: BLE001 - every failure must reach the controller
        app.log(traceback.format_exc())
        print(f"ERROR at this site: {error}", file=sys.stderr, flush=True)
        on_error(error)
        message = status_message(error)
        app.status_message, app.status_state, app.status_finished = message, "error", True
        # At the head of the queue: the controller sees the error on its next poll.
        app.data_outgoing.insert(0, (None, app.get_current_status(
            finished=True, state=fc_engine.State.ERROR.value, message=message)))


def install(fast=False, on_error=lambda error: None):
    """Make the engine pickle-free and its errors explicit (`on_error` hears of them too);
    with `fast`, shorten its sleeps."""
    fc_engine._serialize_outgoing = _serialize_outgoing
    fc_engine._deserialize_incoming = _deserialize_incoming
    fc_engine.app.guarded_run = lambda: _guarded_run(fc_engine.app, on_error)
    if fast:
        for name, seconds in _FAST_WAITS.items():
            setattr(fc_engine, name, seconds)


@dataclass(frozen=True)
class Received:
    sender: str
    data: bytes


def receive(state, memo, n):
    """Wait for `n` payloads sent under `memo`; return them ordered by the senders' position in
    the client list, so that every run combines them in the same order."""
    app = state._app
    key = urllib.parse.quote(memo)  # the controller delivers memos URL-quoted
    while len(app.data_incoming.get(key, [])) < n:
        time.sleep(fc_engine.DATA_POLL_INTERVAL)
    pieces = app.data_incoming.pop(key)
    if len(pieces) > n:
        raise RuntimeError(f"expected {n} payloads under memo '{memo}', got {len(pieces)}")
    order = {client: index for index, client in enumerate(app.clients)}
    received = [Received(sender=client, data=data) for data, client in pieces]
    return sorted(received, key=lambda piece: order.get(piece.sender, len(order)))
