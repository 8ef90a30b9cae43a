"""Centralized vs federated fp32 accuracy on the sample data, per aggregation and communication.

    python -m bench.federated_quality [--seeds N] [--out bench/results/federated_quality.json]
        [--settings iid-3,dirichlet-3,...] [--variants fedavg,fedprox,...]
        [--communications float32,int8] [--jobs 2]

The sample's 5,000 digits (its train and test tensors pooled) are re-split with
`testbed.split.split_dataset` (20 % of each site held out for testing) into IID and
Dirichlet(0.5) label-skewed federations of 3 and 5 sites. Every run uses the sample's
config.yml (LeNet, batch 32, Adam lr 0.002, 2 epochs x 5 rounds) and is evaluated on the union
of the sites' test splits (the federation's weighted test accuracy). Centralized: one site
holding the union of the train splits, the same 10 epochs. Each figure: mean and sample
standard deviation over the seeds (seed s: split seed s, config seed 42 + s).

The federation runs in one process with the app's own pieces in the order the states use
them (Site, federated_average, ServerOptimizer, int8 messages through federation.payload),
so the bytes per round are the bytes the app sends.
"""
import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.simulate import SAMPLE, load_sites, pooled_sample, run_rounds, sample_config
from testbed.split import centralized, split_dataset, write_client_dirs

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "federated_quality.json"
SETTINGS = {  # name -> (split scheme, number of sites)
    "iid-3": ("iid", 3), "iid-5": ("iid", 5),
    "dirichlet-3": ("dirichlet", 3), "dirichlet-5": ("dirichlet", 5),
}
ALPHA = 0.5
# Aggregation variants: config overrides on top of the sample's config.yml.
VARIANTS = {
    "fedavg": {"aggregation": "fedavg"},
    "fedavgm": {"aggregation": "fedavgm"},
    "fedadam": {"aggregation": "fedadam"},
    "fedprox": {"aggregation": "fedavg", "mu": 0.01},
    # The same 10 local epochs in total as 10 rounds x 1 epoch: less client drift per round
    # (centralized keeps the sample's 5 x 2, the same 10 epochs).
    "fedavg-10x1": {"aggregation": "fedavg", "max_iter": 10, "epochs": 1},
    "fedavgm-10x1": {"aggregation": "fedavgm", "max_iter": 10, "epochs": 1},
    "fedavgm-0.6-10x1": {"aggregation": "fedavgm", "server_momentum": 0.6, "max_iter": 10, "epochs": 1},
    "fresh-adam-10x1": {"aggregation": "fedavg", "keep_optimizer_state": False, "max_iter": 10, "epochs": 1},
    "scaffold": {"aggregation": "scaffold"},
    "scaffold-10x1": {"aggregation": "scaffold", "max_iter": 10, "epochs": 1},
}
COMMUNICATIONS = ("float32", "int8")
GOALS = {"skewed_gap": 1.0, "iid_gap": 0.3, "int8_gap": 0.3}  # accuracy points


def write_setting(inputs, labels, setting, seed, config, out_dir):
    """Client dirs of one split, plus `central/`: one site with the union of the train splits."""
    scheme, n_sites = SETTINGS[setting]
    splits = split_dataset(inputs, labels, n_sites, scheme=scheme, alpha=ALPHA, seed=seed)
    model_file = SAMPLE / "generic" / config["model"]
    write_client_dirs(splits, out_dir / "federated", model_file, config)
    write_client_dirs(centralized(splits), out_dir / "central", model_file, config)
    return out_dir / "federated", out_dir / "central"


def run_federation(federation_dir, overrides):
    """Rounds over the client dirs written by write_client_dirs, with config `overrides`."""
    clients = sorted(federation_dir.glob("client_*"))
    return run_rounds(load_sites(clients, federation_dir / "generic", overrides))


def run_seed(inputs, labels, setting, seed, variants, communications, work_dir):
    """{run name: figures} for one split: centralized, then each variant x communication.
    `variants`: {name: config overrides}."""
    config = {**sample_config(), "seed": 42 + seed}
    federation_dir, central_dir = write_setting(inputs, labels, setting, seed, config, work_dir)
    results = {"centralized": run_federation(central_dir, {})}
    for variant, variant_overrides in variants.items():
        for communication in communications:
            overrides = {**variant_overrides, "communication": communication}
            results[f"{variant}/{communication}"] = run_federation(federation_dir, overrides)
    return results


def summarize(values):
    return {"mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "runs": values}


def _run_one(job):
    setting, seed, variants, communications = job
    torch.set_num_threads(1)  # LeNet on batches of 32: one thread per run is fastest
    inputs, labels = pooled_sample()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work_dir:
        results = run_seed(inputs, labels, setting, seed, variants, communications, Path(work_dir))
    print(f"  {setting} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    return results


def run_benchmark(n_seeds, settings, variants, communications=COMMUNICATIONS, jobs=2):
    """Every (setting, seed) in its own process, `jobs` at a time; figures over the seeds.
    `variants`: {name: config overrides}."""
    grid = [(setting, seed, variants, communications) for setting in settings for seed in range(n_seeds)]
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        outcomes = dict(zip([(setting, seed) for setting, seed, *_ in grid], pool.map(_run_one, grid)))
    per_setting = {}
    for setting in settings:
        per_seed = [outcomes[setting, seed] for seed in range(n_seeds)]
        per_setting[setting] = {
            run: {figure: summarize([seed_results[run][figure] for seed_results in per_seed])
                  for figure in ("accuracy", "bytes_per_round", "update_bytes", "global_bytes")}
            for run in per_seed[0]}
    return {"alpha": ALPHA, "seeds": n_seeds, "variants": variants,
            "config": sample_config(), "settings": per_setting, "goals": GOALS}


def table(results):
    lines = [f"{'setting':<12} {'run':<18} {'accuracy %':>16} {'vs central':>10} "
             f"{'int8 vs float':>13} {'bytes/round':>12}"]
    for setting, runs in results["settings"].items():
        central = runs["centralized"]["accuracy"]["mean"]
        for run, figures in runs.items():
            accuracy = figures["accuracy"]
            float_run = runs.get(run.replace("/int8", "/float32"))
            versus_float = (f"{100 * (accuracy['mean'] - float_run['accuracy']['mean']):+.2f}"
                            if run.endswith("/int8") and float_run else "")
            lines.append(f"{setting:<12} {run:<18} {100 * accuracy['mean']:>8.2f} +- "
                         f"{100 * accuracy['std']:<4.2f} {100 * (accuracy['mean'] - central):>+10.2f} "
                         f"{versus_float:>13} {figures['bytes_per_round']['mean']:>12,.0f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--communications", default=",".join(COMMUNICATIONS))
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    args = parser.parse_args(argv)
    settings, variants = args.settings.split(","), args.variants.split(",")
    communications = args.communications.split(",")
    for name, known in ((settings, SETTINGS), (variants, VARIANTS), (communications, COMMUNICATIONS)):
        unknown = [n for n in name if n not in known]
        if unknown:
            parser.error(f"unknown {unknown}; known: {', '.join(known)}")
    started = time.perf_counter()
    results = run_benchmark(args.seeds, settings, {v: VARIANTS[v] for v in variants},
                            communications, jobs=args.jobs)
    results["seconds"] = time.perf_counter() - started
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
