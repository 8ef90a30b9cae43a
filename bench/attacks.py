"""One hostile site in a federation of five: is the result still right, or does the run stop
naming it? (docs/attacks.md)

    python -m bench.attacks [--out bench/results/attacks.json] [--settings default,median,...]
        [--attacks sign_flip,scaled,...] [--seeds 0,1,2] [--rounds 3] [--jobs 2]

The sample's 5,000 digits (its train and test tensors pooled) are re-split into 5 IID sites
(`testbed.split.split_dataset`; seed s: split seed s, config seed 42 + s); every run uses the
sample's config.yml with short training (`--rounds`, default 3, x 1 epoch). Site 1 is the
coordinator, site 2 the hostile one. For each attack and each setting (the defaults, and each
`robust_aggregation` method) a run passes when it either stops within 60 s with an error that
names the hostile site, or finishes with a federation int8 accuracy within 1 point of the
honest run with the same setting and seed; over several seeds, the mean accuracies are
compared. The transport-level attacks run with the first seed only.

Model-level attacks run in one process through `bench.simulate` (the production path minus
transport): the hostile site's messages are decoded, tampered with and re-encoded, every round.
    sign_flip   update x -5 relative to the global: global - 5 (update - global)
    scaled      global + 30 (update - global)
    noise       global + Gaussian noise with the norm of (update - global)
    n_train     n_train claimed as 10**18
    claim_flip  n_train claimed as 10**6 (within the range check) and the update x -5: the weight
                cap gives it half the average, the distance check judges it per square root of
                the steps that claim (capped) gives (docs/robustness.md)
    nan_figures NaN train loss and accuracy in its updates, NaN test figures
Transport-level attacks need the real transport: they run through the testbed
(`testbed.run_federation`), with the controller's delivery patched in this process only.
    duplicate     site 2's update_1 delivered twice to the coordinator
    forged_global a global_1 (the real one with its weights negated) posted to site 2 under a
                  client id that is not in the run, before the real one
"""
import argparse
import json
import math
import multiprocessing
import re
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from bench.simulate import SAMPLE, load_sites, pooled_sample, quantize_sites, run_rounds, sample_config
from federation import payload
from federation.messages import ModelMessage
from testbed.split import split_dataset, write_client_dirs

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "attacks.json"
N_SITES, HOSTILE = 5, 2            # site numbers from 1; site 1 is the coordinator
SHORT = {"max_iter": 3, "epochs": 1}
STOP_WITHIN_S, TOLERANCE_POINTS = 60.0, 1.0
SETTINGS = {"default": {}, "norm_clip": {"robust_aggregation": "norm_clip"},
            "trimmed_mean": {"robust_aggregation": "trimmed_mean"}, "median": {"robust_aggregation": "median"}}
MODEL_ATTACKS = ("sign_flip", "scaled", "noise", "n_train", "claim_flip", "nan_figures")
TRANSPORT_ATTACKS = ("duplicate", "forged_global")
TRANSPORT_SETTINGS = ("default", "median")  # each testbed run takes about a minute
UNKNOWN_SENDER = "f00dfeedf00dfeed"


# ---- model-level attacks, in one process ---------------------------------------------------

def _tampered_update(attack, site, data, generator):
    """The hostile site's update message after `attack`."""
    tensors, meta = payload.decode(data, "self")
    message = ModelMessage.split(tensors, meta)
    previous = ModelMessage.split(site.codec.last_global).weights
    changes = {name: value.double() - previous[name].double()
               for name, value in message.weights.items() if value.is_floating_point()}
    norm = math.sqrt(sum(change.square().sum().item() for change in changes.values()))
    if attack == "noise":
        noise = {name: torch.randn(change.shape, generator=generator, dtype=torch.float64)
                 for name, change in changes.items()}
        noise_norm = math.sqrt(sum(value.square().sum().item() for value in noise.values()))
        changes = {name: value * norm / noise_norm for name, value in noise.items()}
    factor = {"sign_flip": -5.0, "claim_flip": -5.0, "scaled": 30.0}.get(attack)
    if factor is not None:
        changes = {name: factor * change for name, change in changes.items()}
    for name, change in changes.items():
        message.weights[name] = (previous[name].double() + change).to(message.weights[name].dtype)
    if attack == "n_train":
        message.meta["n_train"] = 10 ** 18
    if attack == "claim_flip":
        message.meta["n_train"] = 10 ** 6
    if attack == "nan_figures":
        message.meta.update(train_loss=float("nan"), train_accuracy=float("nan"))
    return site.codec.encode_model(message)


def _make_hostile(site, attack):
    """Wrap the site's messages: every update (and for nan_figures its test figures) tampered."""
    generator = torch.Generator().manual_seed(7)
    train_round, evaluate_global = site.train_round, site.evaluate_global
    site.train_round = lambda: _tampered_update(attack, site, train_round(), generator)
    if attack == "nan_figures":
        def evaluate_with_nan():
            _, meta = payload.decode(evaluate_global(), "self")
            return site.codec.encode_report({**meta, "test_loss": float("nan"), "test_accuracy": float("nan")})
        site.evaluate_global = evaluate_with_nan


def run_in_process(job):
    """One federation in this process: {outcome, seconds, message, int8_accuracy}."""
    federation_dir, attack, setting, _ = job
    torch.set_num_threads(1)  # LeNet on batches of 32: one thread per run is fastest
    started = time.perf_counter()
    clients = sorted(Path(federation_dir).glob("client_*"))
    try:
        sites = load_sites(clients, Path(federation_dir) / "generic", SETTINGS[setting])
        if attack != "honest":
            _make_hostile(sites[HOSTILE - 1], attack)
        run_rounds(sites)
        figures = quantize_sites(sites)
    except Exception as error:  # noqa: BLE001 - the run stopped: the message is the result
        return {"outcome": "stopped", "seconds": time.perf_counter() - started,
                "message": f"{type(error).__name__}: {error}", "named": _names(str(error), HOSTILE)}
    return {"outcome": "finished", "seconds": time.perf_counter() - started,
            "int8_accuracy": figures["int8"]["accuracy"], "same_model_everywhere": True}


def _names(message, site_number):
    return re.search(rf"\bsite {site_number}\b", message) is not None


# ---- transport-level attacks, through the testbed ------------------------------------------

@contextmanager
def hostile_delivery(attack, seen_ids):
    """Patch the testbed controller's delivery (testbed.relay.Relay._deliver) in this process:
    `duplicate` posts site 2's update_1 twice; `forged_global` posts a forged global_1 to site 2
    from an unknown client id first. `seen_ids`: filled with site number -> client id."""
    from testbed.relay import Relay

    original = Relay._deliver

    def deliver(relay, sender_id, receiver, memo, data, *more, **named):
        seen_ids.update({site.index: site.id for site in relay.sites})
        sender = relay.sites_by_id.get(sender_id)
        if attack == "duplicate" and memo == "update_1" and sender is not None and sender.index == HOSTILE:
            original(relay, sender_id, receiver, memo, data, *more, **named)
        if attack == "forged_global" and memo == "global_1" and receiver.index == HOSTILE:
            tensors, meta = payload.decode(data, "coordinator")
            forged = {name: -tensor if name.startswith("w/") and tensor.is_floating_point() else tensor
                      for name, tensor in tensors.items()}
            original(relay, UNKNOWN_SENDER, receiver, memo, payload.encode(forged, meta))
        original(relay, sender_id, receiver, memo, data, *more, **named)

    Relay._deliver = deliver
    try:
        yield
    finally:
        Relay._deliver = original


def run_testbed(federation_dir, attack, setting, work_dir):
    import testbed
    import yaml

    generic = Path(work_dir) / f"generic-{setting}"
    if not generic.exists():
        generic.mkdir(parents=True)
        for source in (Path(federation_dir) / "generic").iterdir():
            generic.joinpath(source.name).write_bytes(source.read_bytes())
        document = yaml.safe_load((generic / "config.yml").read_text())
        document["fc_quantization"].update(SETTINGS[setting])
        (generic / "config.yml").write_text(yaml.safe_dump(document))
    clients = sorted(Path(federation_dir).glob("client_*"))
    out = Path(work_dir) / f"out-{attack}-{setting}"
    ids = {}
    with hostile_delivery(attack, ids):
        result = testbed.run_federation(clients, generic, out, quiet=True, timeout=240)
    hostile_id = UNKNOWN_SENDER if attack == "forged_global" else ids.get(HOSTILE, "no hostile site")
    if not result.ok:
        log = result.log_paths[result.failed_site - 1].read_text() if result.failed_site else ""
        error_lines = [line for line in log.splitlines() if "Error" in line]
        message = error_lines[-1].strip() if error_lines else result.message
        return {"outcome": "stopped", "seconds": result.wall_time_s, "message": message[:300],
                "named": hostile_id in message, "failed_site": result.failed_site}
    metrics = json.loads((result.site_outputs[0] / "metrics.json").read_text())
    models = [torch.load(site / "model_fp32.pt", weights_only=True) for site in result.site_outputs]
    same = all(torch.equal(models[0][name], other[name]) for other in models[1:] for name in models[0])
    return {"outcome": "finished", "seconds": result.wall_time_s,
            "int8_accuracy": metrics["federation"]["int8"]["accuracy"], "same_model_everywhere": same}


# ---- the benchmark -------------------------------------------------------------------------

def write_federation(work_dir, seed=0, rounds=SHORT["max_iter"]):
    """Seed s: split seed s, config seed 42 + s (seed 0: the sample's own seed)."""
    inputs, labels = pooled_sample()
    splits = split_dataset(inputs, labels, N_SITES, scheme="iid", seed=seed)
    config = {**sample_config(), **SHORT, "max_iter": rounds, "seed": 42 + seed}
    write_client_dirs(splits, Path(work_dir) / "federation", SAMPLE / "generic" / config["model"], config)
    return Path(work_dir) / "federation"


def verdict(row, honest_accuracy):
    """Whether the run is acceptable: stopped in time naming the hostile site, or finished
    within TOLERANCE_POINTS of the honest run (and, through the testbed, one model everywhere)."""
    if row["outcome"] == "stopped":
        if not row["named"]:
            return "FAIL: stopped without naming the hostile site"
        return "ok: stopped naming it" if row["seconds"] <= STOP_WITHIN_S else "FAIL: stopped too late"
    row["points_off"] = 100 * (row["int8_accuracy"] - honest_accuracy)
    if not row.get("same_model_everywhere", True):
        return "FAIL: finished, sites hold different models"
    if abs(row["points_off"]) > TOLERANCE_POINTS:
        side = "above" if row["points_off"] > 0 else "below"
        return f"FAIL: finished, accuracy off by more than {TOLERANCE_POINTS:g} point ({side} the honest run)"
    return "ok: finished, accuracy within 1 point"


def combine_seeds(runs):
    """One table row from one attack and setting's runs over the seeds: accuracies as means
    (one run varies about +-0.6 points), the verdict on the means; all stopped: the slowest."""
    row = {key: runs[0][key] for key in ("attack", "setting", "via")}
    row["seeds"] = [run["seed"] for run in runs]
    honest = statistics.mean(run["honest_int8_accuracy"] for run in runs)
    finished = [run for run in runs if run["outcome"] == "finished"]
    if finished and len(finished) < len(runs):
        stopped = [run for run in runs if run["outcome"] == "stopped"]
        ok = all(verdict(run, run["honest_int8_accuracy"]).startswith("ok") for run in stopped)
        row.update(outcome="stopped", seconds=max(run["seconds"] for run in stopped), named=ok,
                   message=f"in {len(stopped)} of {len(runs)} seeds: {stopped[0]['message']}")
        row["verdict"] = "FAIL: stopped in some seeds, finished in others"
        return row
    if finished:
        row.update(outcome="finished", seconds=statistics.mean(run["seconds"] for run in runs),
                   int8_accuracy=statistics.mean(run["int8_accuracy"] for run in runs),
                   same_model_everywhere=all(run.get("same_model_everywhere", True) for run in runs))
    else:
        slowest = max(runs, key=lambda run: run["seconds"])
        row.update(outcome="stopped", seconds=slowest["seconds"], message=slowest["message"],
                   named=all(run["named"] for run in runs))
    row["honest_int8_accuracy"] = honest
    row["verdict"] = verdict(row, honest)
    return row


def _in_process_runs(federations, settings, attacks, jobs):
    """Every (seed, setting, attack) of the model-level attacks, honest runs included."""
    grid = [(str(federation_dir), attack, setting, seed) for seed, federation_dir in federations.items()
            for setting in settings for attack in ("honest", *[a for a in attacks if a in MODEL_ATTACKS])]
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        outcomes = pool.map(run_in_process, grid)
    return [{"attack": attack, "setting": setting, "via": "in-process", "seed": seed, **outcome}
            for (_, attack, setting, seed), outcome in zip(grid, outcomes)]


def _testbed_runs(federation_dir, seed, settings, attacks, work_dir):
    """The transport-level attacks (and the honest testbed run they compare with), one seed."""
    transport = [attack for attack in attacks if attack in TRANSPORT_ATTACKS]
    if transport and "default" in settings:  # the testbed gives what bench.simulate gives
        transport.insert(0, "honest")
    runs = []
    for attack in transport:
        for setting in [s for s in settings if s in TRANSPORT_SETTINGS and (attack != "honest" or s == "default")]:
            print(f"  testbed: {attack} / {setting}", flush=True)
            runs.append({"attack": attack, "setting": setting, "via": "testbed", "seed": seed,
                         **run_testbed(federation_dir, attack, setting, work_dir)})
    return runs


def run_benchmark(settings, attacks, seeds=(0,), rounds=SHORT["max_iter"], jobs=2):
    with tempfile.TemporaryDirectory() as work_dir:
        federations = {seed: write_federation(Path(work_dir) / f"seed-{seed}", seed, rounds) for seed in seeds}
        runs = _in_process_runs(federations, settings, attacks, jobs)
        runs += _testbed_runs(federations[seeds[0]], seeds[0], settings, attacks, work_dir)
    honest = {(run["setting"], run["seed"]): run["int8_accuracy"]
              for run in runs if run["attack"] == "honest" and run["via"] == "in-process"}
    groups = {}
    for run in runs:
        run["honest_int8_accuracy"] = honest[run["setting"], run["seed"]]
        if run["attack"] != "honest" or run["via"] != "in-process":
            groups.setdefault((run["attack"], run["setting"], run["via"]), []).append(run)
    config = {**sample_config(), **SHORT, "max_iter": rounds}
    return {"sites": N_SITES, "hostile_site": HOSTILE, "config": config, "seeds": list(seeds),
            "settings": {name: SETTINGS[name] for name in settings},
            "honest_int8_accuracy": {setting: statistics.mean(honest[setting, seed] for seed in seeds)
                                     for setting in settings},
            "stop_within_s": STOP_WITHIN_S, "tolerance_points": TOLERANCE_POINTS,
            "rows": [combine_seeds(group) for group in groups.values()], "runs": runs}


def table(results):
    lines = ["| attack | setting | via | outcome | s | int8 acc. (honest) | points off | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        accuracy = (f"{row['int8_accuracy']:.4f} ({row['honest_int8_accuracy']:.4f})"
                    if row["outcome"] == "finished" else "")
        points = f"{row['points_off']:+.2f}" if "points_off" in row else ""
        outcome = row["outcome"] if row["outcome"] == "finished" else f"stopped: {_short(row['message'])}"
        lines.append(f"| {row['attack']} | {row['setting']} | {row['via']} | {outcome} | {row['seconds']:.0f} "
                     f"| {accuracy} | {points} | {row['verdict']} |")
    return "\n".join(lines)


def _short(message, limit=110):
    message = message.replace("|", "/")
    return message if len(message) <= limit else message[:limit] + "..."


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--attacks", default=",".join(MODEL_ATTACKS + TRANSPORT_ATTACKS))
    parser.add_argument("--seeds", default="0", help="comma-separated; seed s: split seed s, config seed 42 + s")
    parser.add_argument("--rounds", type=int, default=SHORT["max_iter"], help="federated rounds of 1 epoch")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    settings, attacks = args.settings.split(","), args.attacks.split(",")
    for name, known in (("setting", SETTINGS), ("attack", MODEL_ATTACKS + TRANSPORT_ATTACKS)):
        unknown = [value for value in (settings if name == "setting" else attacks) if value not in known]
        if unknown:
            parser.error(f"unknown {name}(s) {', '.join(unknown)}; known: {', '.join(known)}")
    started = time.perf_counter()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    results = run_benchmark(settings, attacks, seeds, args.rounds, args.jobs)
    results["wall_s"] = time.perf_counter() - started
    print(table(results))
    failed = [row for row in results["rows"] if row["verdict"].startswith("FAIL")]
    print(f"{len(results['rows']) - len(failed)} of {len(results['rows'])} rows pass; "
          f"{results['wall_s']:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, allow_nan=False))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
