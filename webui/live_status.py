"""What the status page shows: a thread-safe record the app's states update."""
import copy
import threading

# The fields the states may set; anything else is a typo and is refused.
FIELDS = (
    "site_id", "coordinator", "state", "message", "round", "max_iter",
    "federation_accuracy", "site_accuracy", "finished", "error", "results",
)


class LiveStatus:
    """The latest known figures of this site, written by the state thread, read by the web page."""

    def __init__(self):
        self._lock = threading.Lock()
        self._fields = {}

    def update(self, **fields) -> None:
        unknown = sorted(set(fields) - set(FIELDS))
        if unknown:
            raise TypeError(f"webui.LiveStatus.update: unknown field(s) {unknown}; known fields: {list(FIELDS)}")
        # Copied so that a caller mutating its dict later cannot change what the page shows.
        fresh = copy.deepcopy(fields)
        with self._lock:
            self._fields.update(fresh)

    def snapshot(self) -> dict:
        with self._lock:
            return copy.deepcopy(self._fields)


live_status = LiveStatus()
