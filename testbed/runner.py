"""run_federation: N sites as local processes, driven the way the FeatureCloud controller does."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from testbed.relay import Relay
from testbed.report import failure_report, finished_message, progress_key, progress_line
from testbed.site import HTTP_TIMEOUT_S, Site, SiteFailure, free_ports, stop_sites

# The real controller polls every 2.0 s; locally a short interval keeps runs fast.
DEFAULT_QUERY_INTERVAL_S = 0.2
DEFAULT_TIMEOUT_S = 900.0
# A site whose HTTP server is not up by then counts as failed.
STARTUP_WAIT_S = 60.0
DEFAULT_APP = Path(__file__).resolve().parent.parent / "main.py"


@dataclass
class FederationResult:
    ok: bool
    failed_site: int | None  # 1-based index of the failing site, None for a timeout
    message: str
    site_outputs: list[Path]  # out_dir/client_<i>, in order of the client dirs
    log_paths: list[Path]
    wall_time_s: float
    bytes_relayed: int  # every payload body the controller POSTed to a site
    bytes_by_memo: dict[str, int] = field(default_factory=dict)
    last_status: list[dict | None] = field(default_factory=list)  # per site
    # What each site received from the controller, by 1-based site index: [{memo, sender (site
    # index), smpc_aggregate (the SMPC sum, posted in the coordinator's name), bytes}];
    # also written to out_dir/received.json.
    received: dict[int, list] = field(default_factory=dict)


class RunTimeout(Exception):
    pass


# Cleans up after a testbed that dies without doing it (SIGKILL, OOM): it reads the sites'
# process groups from its stdin; at end of file without "done", the testbed is gone, so it
# kills the groups and removes the work dir. In its own session, Ctrl-C does not reach it.
JANITOR = r"""
import os, shutil, signal, sys
groups, done = [], False
for line in sys.stdin:
    word, _, value = line.strip().partition(" ")
    if word == "group":
        groups.append(int(value))
    elif word == "done":
        done = True
if not done:
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except OSError:
            pass
    shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


class Janitor:
    def __init__(self, work_dir):
        self.process = subprocess.Popen(
            [sys.executable, "-c", JANITOR, str(work_dir)], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, text=True)

    def watch(self, site):
        self._send(f"group {site.process.pid}")

    def done(self):
        """The testbed cleaned up itself: the janitor leaves without touching anything."""
        self._send("done")
        try:
            self.process.stdin.close()
            self.process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()

    def _send(self, line):
        try:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        except OSError:
            pass


def run_federation(client_dirs, generic_dir, out_dir, query_interval=DEFAULT_QUERY_INTERVAL_S,
                   app=DEFAULT_APP, timeout=DEFAULT_TIMEOUT_S, relay_filter=None, quiet=False,
                   on_started=None, on_finished=None, response_timeout=HTTP_TIMEOUT_S):
    """Run one federation; the first client dir is the coordinator.

    relay_filter(sender_index, receiver_index, memo, payload) -> bytes may replace any payload
    on its way (indices 1-based; SMPC contributions pass it on their way to the coordinator);
    returning a list of testbed.relay.Delivery instead drops, duplicates or re-addresses it
    (another claimed sender or memo), as a hostile relay or peer would.
    A site that does not answer within `response_timeout` s fails the run as "not responding";
    the sites die with this process, even when it is SIGKILLed. on_started(ports): once every
    site is set up (ports in order; each serves /api and /web); on_finished(ports): once every
    site has finished, before the sites are stopped (their /web pages still answer)."""
    started = time.monotonic()
    deadline = started + timeout
    out_dir = Path(out_dir)
    _check_inputs(client_dirs, generic_dir, app)
    app = Path(app).resolve()  # the app runs with its own dir as working dir
    work_dir = Path(tempfile.mkdtemp(prefix="fc-testbed-"))
    janitor = Janitor(work_dir)
    sites = [Site(index, client_dir, work_dir, out_dir / "logs" / f"client_{index}.log",
                  response_timeout=response_timeout)
             for index, client_dir in enumerate(client_dirs, start=1)]
    relay = Relay(sites, relay_filter)
    ok, failed_site, message = False, None, "interrupted"
    try:
        _start_all(sites, app, generic_dir, janitor)
        _setup_all(sites, deadline)
        if on_started is not None:
            on_started([site.port for site in sites])
        _poll_until_finished(sites, relay, query_interval, deadline, quiet)
        if on_finished is not None:
            on_finished([site.port for site in sites])
        ok, message = True, finished_message(len(sites))
    except SiteFailure as failure:
        failed_site, message = failure.site.index, str(failure)
    except RunTimeout as error:
        message = str(error)
    finally:
        stop_sites(sites)
        site_outputs = _collect_outputs(sites, out_dir)
        shutil.rmtree(work_dir, ignore_errors=True)
        janitor.done()
    result = FederationResult(
        ok=ok, failed_site=failed_site, message=message, site_outputs=site_outputs,
        wall_time_s=time.monotonic() - started, **_relay_and_site_records(sites, relay))
    _write_received(out_dir, result.received)
    if not ok and not quiet:
        print(failure_report(result, sites), flush=True)
    return result


def _relay_and_site_records(sites, relay):
    return {"log_paths": [site.log_path for site in sites], "bytes_relayed": relay.bytes_relayed,
            "bytes_by_memo": dict(relay.bytes_by_memo), "received": dict(relay.received),
            "last_status": [site.last_status for site in sites]}


def _write_received(out_dir, received):
    """received.json: what each site was delivered, by whom (secure aggregation's evidence)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "received.json").write_text(json.dumps(
        {f"client_{index}": deliveries for index, deliveries in sorted(received.items())}, indent=1))


def _start_all(sites, app, generic_dir, janitor):
    """Start every site's process, each with its share of the cores, watched by the janitor."""
    threads = max(1, (os.cpu_count() or 1) // len(sites))
    for site, port in zip(sites, free_ports(len(sites))):
        site.start(app, None if generic_dir is None else Path(generic_dir), threads, port)
        janitor.watch(site)


def _check_inputs(client_dirs, generic_dir, app):
    if not client_dirs:
        raise ValueError("run_federation needs at least one client dir")
    for client_dir in client_dirs:
        if not Path(client_dir).is_dir():
            raise FileNotFoundError(f"client dir not found: {client_dir}")
    if generic_dir is not None and not Path(generic_dir).is_dir():
        raise FileNotFoundError(f"generic dir not found: {generic_dir}")
    if not Path(app).is_file():
        raise FileNotFoundError(f"app not found: {app}")


def _setup_all(sites, deadline):
    """POST /setup to every site at once (each answer takes the engine's 1 s sleep)."""
    client_ids = [site.id for site in sites]
    pool = ThreadPoolExecutor(max_workers=len(sites))
    try:
        futures = [pool.submit(site.setup, site is sites[0], client_ids, STARTUP_WAIT_S, deadline)
                   for site in sites]
        for future in as_completed(futures):
            future.result()  # re-raises the first SiteFailure as soon as it happens
    finally:
        # Don't wait for the others: once the sites are stopped their retries end by themselves.
        pool.shutdown(wait=False, cancel_futures=True)


def _poll_until_finished(sites, relay, query_interval, deadline, quiet):
    shown = {}
    while True:
        if time.monotonic() > deadline:
            unfinished = ", ".join(site.name for site in sites if not site.finished)
            raise RunTimeout(f"run exceeded the timeout; unfinished: {unfinished}")
        for site in sites:
            site.check_alive()
        for site in sites:
            if not site.finished:
                _drain(site, relay, shown, quiet)
        if all(site.finished for site in sites):
            return
        time.sleep(query_interval)


def _drain(site, relay, shown, quiet):
    """status, data, status, data... while the site has data queued (strictly sequential)."""
    while True:
        status = site.get_status()
        _show_progress(site, status, shown, quiet)
        if status.get("state") == "error":
            raise SiteFailure(site, f"reported state error: {status.get('message')}")
        if not status.get("available"):
            site.finished = bool(status.get("finished"))
            return
        relay.route(site, status, site.get_data())


def _show_progress(site, status, shown, quiet):
    key = progress_key(status)
    if shown.get(site.index) != key:
        shown[site.index] = key
        if not quiet:
            print(progress_line(site.name, status), flush=True)


def _collect_outputs(sites, out_dir):
    """Copy each site's output dir to out_dir/client_<i> (replacing an older run's)."""
    outputs = []
    for site in sites:
        target = out_dir / site.name
        if target.exists():
            shutil.rmtree(target)
        if site.output_dir.is_dir():
            shutil.copytree(site.output_dir, target)
        else:
            target.mkdir(parents=True)
        outputs.append(target)
    return outputs
