"""Latency: the median of timed calls, taken one measurement at a time per machine.

Sites that share a machine's cores (the local testbed runs one process per site) would time
their models at the same moment and slow each other down: one testbed run read fp32/int8
speed-ups from 1.5x to 7.3x for the same model. When the environment variable FC_LATENCY_LOCK
names a file, every measurement holds an exclusive lock on it (flock), so the processes that
share the file take turns; the testbed sets it for its sites. Unset, as on FeatureCloud where
each site has its own machine, nothing is locked.
"""
import contextlib
import os
import statistics
import threading
import time

from .errors import QuantizationError

LATENCY_LOCK_ENV = "FC_LATENCY_LOCK"
# Threads of one process take turns too; it also guards _depth, which lets a measurement
# slot be entered again by the thread that holds it (a second flock on a new descriptor of
# the same file would wait for ourselves).
_IN_PROCESS = threading.RLock()
_depth = 0


@contextlib.contextmanager
def measurement_slot():
    """Hold the machine's measurement slot: the FC_LATENCY_LOCK file's lock, if it is set."""
    global _depth
    with _IN_PROCESS:
        path = os.environ.get(LATENCY_LOCK_ENV)
        with contextlib.ExitStack() as stack:
            if path and _depth == 0:
                _lock_file(stack, path)
            _depth += 1
            try:
                yield
            finally:
                _depth -= 1


def _lock_file(stack, path):
    import fcntl  # Unix only; imported where a lock is asked for (the testbed's sites)
    try:
        lock_file = stack.enter_context(open(path, "a"))
    except OSError as error:
        raise QuantizationError(f"{LATENCY_LOCK_ENV}={path}: cannot open the lock file: {error}") from None
    fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file is closed


def median_ms(run, batch, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of `run(batch)` in milliseconds, after `warmup` untimed calls, all
    inside the measurement slot."""
    if repeats < 1:
        raise QuantizationError(f"latency: repeats must be at least 1, got {repeats}")
    with measurement_slot():
        for _ in range(warmup):
            run(batch)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(batch)
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)
