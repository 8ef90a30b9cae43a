"""python -m bench.federation: what a federation costs beyond the training itself.

    python -m bench.federation [--sites 3 5 8] [--out bench/results/federation.json] [--real-timing]

Runs the real app through the testbed (processes, HTTP, the engine) once per site count:
3 sites are the bundled sample; any other count re-splits the sample's pooled 5000 digits
IID with `testbed.split` and the sample's config.yml. Per run it reports the wall time, each
site's compute (metrics.json `seconds`: train, evaluate, quantize), the protocol's overhead
(wall time minus the slowest site's compute), the messages relayed and the bytes per round.

The testbed polls every 0.2 s and shortens the engine's sleeps; the real controller polls
every 2 s and the engine sleeps 1 s between states and 10 s in `terminal`. The table adds an
estimate of the overhead under those timings; `--real-timing` also measures it, with one more
3-site run under the real timings.
"""
import argparse
import json
import os
import re
import shlex
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


from bench.simulate import SAMPLE_CLIENTS, SAMPLE_GENERIC, pooled_sample
from testbed.runner import DEFAULT_QUERY_INTERVAL_S, run_federation
from testbed.split import read_config, split_dataset, write_client_dirs

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_SITES = len(SAMPLE_CLIENTS)
DEFAULT_SITES = (3, 5, 8)
DEFAULT_OUT = Path("bench/results/federation.json")
SPLIT_SEED = 0
SPLIT_TEST_FRACTION = 0.2  # as in the sample: 4000 train + 1000 test digits in all
RUN_TIMEOUT_S = 1800.0

# Timings of production vs the testbed (FeatureCloud's engine constants; federation.engine's
# fast mode, which the testbed turns on).
CONTROLLER_QUERY_INTERVAL_S = 2.0
ENGINE_TRANSITION_WAIT_S = 1.0
FAST_TRANSITION_WAIT_S = 0.02
ENGINE_TERMINAL_WAIT_S = 10.0
FAST_TERMINAL_WAIT_S = 1.0
# States every site runs besides local_train and aggregate: initial, quantize, write_results.
STATES_OUTSIDE_ROUNDS = 3

ROUND_MEMO = re.compile(r"^(?P<kind>[a-z]+)_(?P<round>\d+)$")


# ---------------------------------------------------------------- the sites of one run

def prepare_sites(n_sites, work_dir):
    """(client dirs, generic dir, where the data comes from) for a run with `n_sites` sites."""
    if n_sites == SAMPLE_SITES:
        return SAMPLE_CLIENTS, SAMPLE_GENERIC, "sample"
    inputs, labels = pooled_sample()
    splits = split_dataset(inputs, labels, n_sites, "iid", test_fraction=SPLIT_TEST_FRACTION,
                           seed=SPLIT_SEED)
    config = read_config(SAMPLE_GENERIC / "config.yml")
    out = Path(work_dir) / f"sites_{n_sites}"
    write_client_dirs(splits, out, SAMPLE_GENERIC / config["model"], config)
    client_dirs = [out / f"client_{i}" for i in range(1, n_sites + 1)]
    return client_dirs, out / "generic", f"sample re-split IID (seed {SPLIT_SEED})"


@contextmanager
def engine_timings(real):
    """Run the sites with the engine's own sleeps (real) or the testbed's short ones."""
    previous = os.environ.get("FC_FAST_ENGINE")
    os.environ["FC_FAST_ENGINE"] = "0" if real else "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["FC_FAST_ENGINE"]
        else:
            os.environ["FC_FAST_ENGINE"] = previous


def run_sites(n_sites, work_dir, real_timing=False):
    """One federation through the testbed; returns its measurements (see `measure`)."""
    client_dirs, generic_dir, data = prepare_sites(n_sites, work_dir)
    query_interval = CONTROLLER_QUERY_INTERVAL_S if real_timing else DEFAULT_QUERY_INTERVAL_S
    out = Path(work_dir) / f"run_{n_sites}{'_real' if real_timing else ''}"
    # Other processes on the machine slow every site down; the load says how much there was.
    load_at_start = os.getloadavg()[0]
    started = time.monotonic()
    set_up_after = []
    with engine_timings(real_timing):
        result = run_federation(client_dirs, generic_dir, out, query_interval=query_interval,
                                timeout=RUN_TIMEOUT_S, quiet=True,
                                on_started=lambda ports: set_up_after.append(time.monotonic() - started))
    if not result.ok:
        raise RuntimeError(f"{n_sites}-site run failed: {result.message} (logs in {out / 'logs'})")
    return {"n_sites": n_sites, "data": data, "query_interval_s": query_interval,
            "engine_timings": "real" if real_timing else "fast", "load_average_at_start": load_at_start,
            # Processes started (torch imported) and /setup answered by every site.
            "startup_s": set_up_after[0], **measure(result)}


# ---------------------------------------------------------------- what one run cost

def measure(result):
    """Wall time, per-site compute, overhead, messages and bytes of one finished run."""
    metrics = [json.loads((site / "metrics.json").read_text()) for site in result.site_outputs]
    seconds = [site_metrics["seconds"] for site_metrics in metrics]
    slowest_compute = max(sum(site_seconds.values()) for site_seconds in seconds)
    n_rounds = len(metrics[0]["rounds"])
    relayed_by_round = bytes_by_round(result.bytes_by_memo)
    sent_by_round = [sum(site_metrics["rounds"][r]["bytes_sent"] for site_metrics in metrics)
                     for r in range(n_rounds)]
    return {
        "wall_time_s": result.wall_time_s,
        "site_seconds": seconds,
        "mean_site_seconds": {activity: mean([s[activity] for s in seconds]) for activity in seconds[0]},
        "slowest_site_compute_s": slowest_compute,
        "overhead_s": result.wall_time_s - slowest_compute,
        "rounds": n_rounds,
        "messages": len(result.bytes_by_memo),
        "messages_per_round": messages_per_round(result.bytes_by_memo),
        "relayed_bytes_total": result.bytes_relayed,
        "relayed_bytes_per_round": mean(relayed_by_round.values()),
        "sent_bytes_per_round": mean(sent_by_round),
        "federation_accuracy": {precision: metrics[0]["federation"][precision]["accuracy"]
                                for precision in ("fp32", "int8")},
    }


def mean(values):
    values = list(values)
    return sum(values) / len(values)


def bytes_by_round(bytes_by_memo):
    """Relayed bytes of each training round r >= 1 (memos `<kind>_<r>`: update, global, test)."""
    totals = {}
    for memo, size in bytes_by_memo.items():
        match = ROUND_MEMO.match(memo)
        if match and int(match["round"]) >= 1:
            round_number = int(match["round"])
            totals[round_number] = totals.get(round_number, 0) + size
    return totals


def messages_per_round(bytes_by_memo):
    """How many memos the controller relays in one training round (they are the same every round)."""
    kinds_by_round = {}
    for memo in bytes_by_memo:
        match = ROUND_MEMO.match(memo)
        if match and int(match["round"]) >= 1:
            kinds_by_round.setdefault(int(match["round"]), set()).add(match["kind"])
    return max(len(kinds) for kinds in kinds_by_round.values())


def production_overhead(run):
    """Estimated overhead under the real controller and engine timings, from the testbed's.

    Each relayed message waits for the controller's next poll: on average half an interval,
    so every message adds (2.0 - 0.2) / 2 s, plus one more wait for the final `finished`
    status. Every state is followed by the engine's 1 s transition wait instead of 0.02 s,
    and `terminal` waits 10 s instead of 1 s before it reports `finished`.
    """
    polls = run["messages"] + 1
    poll_extra = polls * (CONTROLLER_QUERY_INTERVAL_S - run["query_interval_s"]) / 2
    states = STATES_OUTSIDE_ROUNDS + 2 * run["rounds"]
    transition_extra = states * (ENGINE_TRANSITION_WAIT_S - FAST_TRANSITION_WAIT_S)
    terminal_extra = ENGINE_TERMINAL_WAIT_S - FAST_TERMINAL_WAIT_S
    return run["overhead_s"] + poll_extra + transition_extra + terminal_extra


# ---------------------------------------------------------------- the table

COLUMNS = (
    ("sites", lambda run: f"{run['n_sites']}"),
    ("wall s", lambda run: f"{run['wall_time_s']:.1f}"),
    ("train s/site", lambda run: f"{run['mean_site_seconds']['train']:.1f}"),
    ("eval s/site", lambda run: f"{run['mean_site_seconds']['evaluate']:.1f}"),
    ("quant s/site", lambda run: f"{run['mean_site_seconds']['quantize']:.1f}"),
    ("slowest compute s", lambda run: f"{run['slowest_site_compute_s']:.1f}"),
    ("overhead s", lambda run: f"{run['overhead_s']:.1f}"),
    ("of which startup s", lambda run: f"{run['startup_s']:.1f}"),
    ("msgs (per round)", lambda run: f"{run['messages']} ({run['messages_per_round']})"),
    ("relayed KB/round", lambda run: f"{run['relayed_bytes_per_round'] / 1024:.0f}"),
    ("sent KB/round", lambda run: f"{run['sent_bytes_per_round'] / 1024:.0f}"),
    ("overhead @2 s poll (est.)", lambda run: f"{run['production_overhead_estimate_s']:.0f}"),
    ("int8 acc", lambda run: f"{run['federation_accuracy']['int8']:.4f}"),
)


def format_table(runs):
    """A Markdown table, one row per run."""
    header = "| " + " | ".join(name for name, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---:" for _ in COLUMNS) + "|"
    rows = ["| " + " | ".join(cell(run) for _, cell in COLUMNS) + " |" for run in runs]
    return "\n".join([header, rule, *rows])


def format_real_timing(fast_run, real_run):
    return (f"3 sites at the real timings (2 s poll, engine sleeps): wall {real_run['wall_time_s']:.1f} s, "
            f"overhead {real_run['overhead_s']:.1f} s measured vs "
            f"{fast_run['production_overhead_estimate_s']:.1f} s estimated from the testbed run")


# ---------------------------------------------------------------- command line

def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.federation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=list(DEFAULT_SITES),
                        help=f"site counts to run; {SAMPLE_SITES} is the bundled sample, others "
                             f"re-split it (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (default: %(default)s)")
    parser.add_argument("--real-timing", action="store_true",
                        help=f"also run {SAMPLE_SITES} sites with the controller's 2 s poll and "
                             f"the engine's own sleeps, to check the estimate")
    args = parser.parse_args(argv)
    if any(n < 2 for n in args.sites):
        parser.error(f"--sites {args.sites}: a federation needs at least 2 sites")
    return args


def run_benchmark(site_counts, real_timing=False):
    """Every requested run (and the real-timing check); returns the JSON document."""
    runs, real_run = [], None
    with tempfile.TemporaryDirectory(prefix="bench-federation-") as work_dir:
        for n_sites in site_counts:
            started = time.monotonic()
            run = run_sites(n_sites, work_dir)
            run["production_overhead_estimate_s"] = production_overhead(run)
            runs.append(run)
            print(f"{n_sites} sites done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        if real_timing:
            real_run = run_sites(SAMPLE_SITES, work_dir, real_timing=True)
    return {"cpu_count": os.cpu_count(), "runs": runs, "real_timing_run": real_run}


def main(argv=None):
    args = parse_args(argv)
    document = run_benchmark(args.sites, args.real_timing)
    document["command"] = shlex.join(["python", "-m", "bench.federation", *(argv if argv is not None else sys.argv[1:])])
    print(format_table(document["runs"]))
    fast_sample = next((run for run in document["runs"] if run["n_sites"] == SAMPLE_SITES), None)
    if document["real_timing_run"] is not None and fast_sample is not None:
        print(format_real_timing(fast_sample, document["real_timing_run"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
