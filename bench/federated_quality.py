"""Centralized vs federated fp32 accuracy on real data, per dataset, split, site count and rule.

    python -m bench.federated_quality [--datasets mnist,animals] [--sites 3,5,10]
        [--splits iid,dirichlet-0.1,dirichlet-0.5] [--variants fedavg,fedavgm,...|none] [--seeds 3]
        [--rounds R --epochs E --batch-size B] [--logit-adjustment S] [--learning-rate-schedule S]
        [--model data/models/mnist_bn_model.py]
        [--communications float32,int8]
        [--jobs 2] [--estimate]
        [--out bench/results/federated_quality.json]

Each dataset of bench.datasets (mnist: the sample's 5,000 digits; animals: 10,000 animal
silhouettes) is pooled and re-split with `testbed.split.split_dataset` (20 % of each site held
out for testing) into IID or Dirichlet(alpha) label-skewed federations. Every run uses the
sample's config.yml (LeNet, batch 32, Adam lr 0.005, 5 rounds x 2 epochs unless --rounds /
--epochs / --batch-size; --model: another model file for 1x28x28 inputs and 10 classes) and is
scored on the union of the sites' test splits (the federation's weighted test accuracy). Two
centralized baselines, one site holding the union of the train splits:
  central        the same epochs (equal passes over the data);
  central-steps  as many optimizer steps as the mean site takes in the federation
                 (rounds x epochs x ceil(n_site / batch)): fewer samples seen, K times fewer
                 with K equal sites.
Per row: mean and sample standard deviation over the seeds (seed s: split seed s, config seed
42 + s) of the accuracy, of the gap to each baseline, and of the largest round-to-round drop
of any site's test accuracy in the converging part of the run (`max_drop`: from round 3 on, at
sites with >= 100 test samples; a collapsing run shows here, not in the last round), and the
same over the second half of the rounds (`late_drop`: round 3 of 5, as max_drop, but round 20
of 40: the same share of the passes whatever the rounds' length), and the last round's training
loss (`train_loss`, the sites' mean over their steps, weighted by training samples: how far the
run fitted its data).

The federation runs in one process with the app's own pieces in the order the states use them
(bench.simulate: Site, Coordinator, the payload bytes), so bytes per round are the app's.
--estimate times one federated run and prints the estimated time of the grid asked for.
"""
import argparse
import json
import math
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.datasets import DATASETS
from bench.simulate import SAMPLE, load_sites, run_rounds, sample_config
from federation.checks import PeerMessageError
from quant.errors import QuantizationError
from testbed.split import centralized, split_dataset, write_client_dirs

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "federated_quality.json"
SPLITS = {"iid": ("iid", None), "dirichlet-0.1": ("dirichlet", 0.1), "dirichlet-0.5": ("dirichlet", 0.5)}
SITES = (3, 5, 10)
# Aggregation variants: config overrides on top of the sample's config.yml.
VARIANTS = {
    "fedavg": {"aggregation": "fedavg"},
    "fedavgm": {"aggregation": "fedavgm"},
    "fedadam": {"aggregation": "fedadam"},
    "fedprox": {"aggregation": "fedavg", "mu": 0.01},
    "scaffold": {"aggregation": "scaffold"},
    # The same 10 local epochs in total as 5 rounds x 2 epochs: less client drift per round.
    "fedavg-10x1": {"aggregation": "fedavg", "max_iter": 10, "epochs": 1},
    "fedavgm-10x1": {"aggregation": "fedavgm", "max_iter": 10, "epochs": 1},
    "fedavgm-0.6-10x1": {"aggregation": "fedavgm", "server_momentum": 0.6, "max_iter": 10, "epochs": 1},
    "fresh-adam-10x1": {"aggregation": "fedavg", "keep_optimizer_state": False, "max_iter": 10, "epochs": 1},
    "scaffold-10x1": {"aggregation": "scaffold", "max_iter": 10, "epochs": 1},
    "fedavg-20x0.5": {"aggregation": "fedavg", "max_iter": 20, "epochs": 0.5},
    "scaffold-20x0.5": {"aggregation": "scaffold", "max_iter": 20, "epochs": 0.5},
    # SCAFFOLD with server momentum (README, "Server momentum with SCAFFOLD").
    "scaffold-m0.3-20x0.5": {"aggregation": "scaffold", "server_momentum": 0.3, "max_iter": 20, "epochs": 0.5},
    # With quarter-epoch rounds and model_ema 0.7 (README, "Server momentum at quarter-epoch rounds").
    **{f"scaffold-m{momentum}-ema0.7": {"aggregation": "scaffold", "server_momentum": momentum, "model_ema": 0.7}
       for momentum in (0.3, 0.5)},
    # Eighth-epoch rounds (80 x 0.125): the average over about as many epochs as 0.7 at 40 x 0.25;
    # at 40 x 0.25 a longer average against the late drops (README, "Drops in the second half").
    **{f"scaffold-m{momentum}-ema0.85": {"aggregation": "scaffold", "server_momentum": momentum, "model_ema": 0.85}
       for momentum in (0.3, 0.5)},
    # The same without SCAFFOLD's correction, at IID sites (README, "Beyond eighth-epoch rounds").
    "fedavgm-0.3-ema0.85": {"aggregation": "fedavgm", "server_momentum": 0.3, "model_ema": 0.85},
    # Sixteenth-epoch rounds (160 x 0.0625; the average over as many epochs as 0.85 at 80 x 0.125),
    # and at 80 x 0.125 a longer average against late swings (README, "Beyond eighth-epoch rounds").
    "scaffold-m0.3-ema0.925": {"aggregation": "scaffold", "server_momentum": 0.3, "model_ema": 0.925},
    # Eighth-epoch rounds at other local rates: tries at the 10 IID animal sites, which fit
    # their training data less closely than centralized training (README, "Beyond eighth-epoch rounds").
    **{f"scaffold-m0.3-ema0.85-lr{rate}": {"aggregation": "scaffold", "server_momentum": 0.3, "model_ema": 0.85,
                                          "learning_rate": rate} for rate in (0.0025, 0.0035, 0.0075, 0.01)},
    # ... and at larger server steps: the sites' average of short rounds moves like one large batch,
    # which wants a larger step than each site's (README, "Beyond eighth-epoch rounds").
    **{f"scaffold-m0.3-ema0.85-slr{rate}": {"aggregation": "scaffold", "server_momentum": 0.3, "model_ema": 0.85,
                                           "server_learning_rate": rate} for rate in (1.5, 2, 3)},
    # The moving average of the rounds' global models (README, "Averaging the rounds' models"); 0.7
    # for rounds of a quarter epoch (README, "Quarter-epoch rounds"), 0.85 for an eighth at 3 sites
    # (README, "Beyond eighth-epoch rounds").
    **{f"scaffold-ema{decay}": {"aggregation": "scaffold", "model_ema": decay} for decay in (0.5, 0.7, 0.85)},
    "scaffold-ema0.5-10x1": {"aggregation": "scaffold", "model_ema": 0.5, "max_iter": 10, "epochs": 1},
    **{f"scaffold-ema{decay}-20x0.5": {"aggregation": "scaffold", "model_ema": decay, "max_iter": 20, "epochs": 0.5}
       for decay in (0.5, 0.7)},
    # With batch 8 (README, "Small sites"): half or twice the learning rate.
    **{f"scaffold-ema0.5-20x0.5-lr{rate}": {"aggregation": "scaffold", "model_ema": 0.5, "max_iter": 20,
                                            "epochs": 0.5, "learning_rate": rate} for rate in (0.0025, 0.01)},
    # Logit adjustment (README, "Logit adjustment"): the variants above train with the default
    # (auto: 0.5); these turn it off or set the full correction.
    "scaffold-la0": {"aggregation": "scaffold", "logit_adjustment": 0},
    "scaffold-la0-20x0.5": {"aggregation": "scaffold", "logit_adjustment": 0, "max_iter": 20, "epochs": 0.5},
    **{f"scaffold-la{strength}-20x0.5": {"aggregation": "scaffold", "logit_adjustment": strength,
                                         "max_iter": 20, "epochs": 0.5} for strength in (0.25, 1)},
    "fedavg-la0": {"aggregation": "fedavg", "logit_adjustment": 0},
    # The local learning rate around the default 0.005 (README, "Why learning_rate: 0.005").
    **{f"{rule}-lr{rate}": {"aggregation": rule, "learning_rate": rate}
       for rule in ("fedavg", "scaffold") for rate in (0.002, 0.01)},
}
RULES = ("fedavg", "fedavgm", "fedadam", "fedprox", "scaffold")  # the default variants
COMMUNICATIONS = ("float32", "int8")
FIGURES = ("accuracy", "gap_central", "gap_central_steps", "max_drop", "late_drop", "train_loss", "bytes_per_round")


def setting_name(split, n_sites):
    return f"{split}/{n_sites}"


def write_setting(inputs, labels, split, n_sites, seed, config, out_dir):
    """Client dirs of one split (`federated/`), `central/` (one site with the union of the train
    splits) and `central-steps/` (that union cycled in seeded permutations, cut to the mean
    site's number of samples over the run: trained for one epoch, it takes as many steps)."""
    scheme, alpha = SPLITS[split]
    splits = split_dataset(inputs, labels, n_sites, scheme=scheme, alpha=alpha or 0.5, seed=seed)
    model_file = SAMPLE / "generic" / config["model"]
    write_client_dirs(splits, out_dir / "federated", model_file, config)
    (pooled,) = centralized(splits)
    write_client_dirs([pooled], out_dir / "central", model_file, config)
    batch, epochs = config["batch_size"], config["max_iter"] * config["epochs"]
    steps = statistics.mean(epochs * math.ceil(len(split[1]) / batch) for split in splits)
    rows = equal_step_rows(len(pooled[1]), round(steps) * batch, seed)
    steps_split = (pooled[0][rows], pooled[1][rows], pooled[2], pooled[3])
    write_client_dirs([steps_split], out_dir / "central-steps", model_file, config)


def equal_step_rows(n_samples, n_rows, seed):
    """`n_rows` indices into `n_samples`: whole seeded permutations one after another, cut."""
    generator = torch.Generator().manual_seed(seed)
    passes = [torch.randperm(n_samples, generator=generator) for _ in range(math.ceil(n_rows / n_samples))]
    return torch.cat(passes)[:n_rows]


def run_federation(federation_dir, overrides):
    """Rounds over the client dirs written by write_client_dirs, with config `overrides`; a run
    that stops as the app would (a check refusing an update, convert refusing the int8 model)
    is a row of its own, {"stopped": the message}, and the grid goes on."""
    clients = sorted(federation_dir.glob("client_*"))
    try:
        result = run_rounds(load_sites(clients, federation_dir / "generic", overrides))
    except (PeerMessageError, QuantizationError) as error:
        return {"stopped": f"{type(error).__name__}: {error}"}
    accuracies, counts = result["site_test_accuracy"], result["site_test_counts"]
    return {**result, "max_drop": max_site_drop(accuracies, counts), "late_drop": late_site_drop(accuracies, counts),
            "train_loss": result["rounds"][-1]["train_loss"]}


# `max_drop` looks at the converging part of a run only: from round SETTLED_ROUND on (on a
# label-skewed split the first rounds swing by design) and at sites with at least
# MIN_TEST_SAMPLES test samples (below that one image is more than a point).
SETTLED_ROUND = 3
MIN_TEST_SAMPLES = 100


def max_site_drop(site_accuracies, site_test_counts, from_round=SETTLED_ROUND):
    """The largest fall of one site's test accuracy from one round to the next, both rounds
    >= from_round (1-based), at sites with >= MIN_TEST_SAMPLES test samples (0: none)."""
    drops = [before - after
             for rounds, n_test in zip(site_accuracies, site_test_counts) if n_test >= MIN_TEST_SAMPLES
             for before, after in zip(rounds[from_round - 1:], rounds[from_round:])]
    return max([0.0] + drops)


def late_site_drop(site_accuracies, site_test_counts):
    """max_site_drop over the second half of the rounds run, from round ceil(R / 2) on (never
    before SETTLED_ROUND). SETTLED_ROUND was set for the sample's 5 x 2 epochs, where round 3
    is that half; with 40 quarter-epoch rounds it falls 0.75 epochs into training, where a
    label-skewed site still swings as it learns (by round 7 in the runs looked at)."""
    n_rounds = len(site_accuracies[0]) if site_accuracies else 0
    return max_site_drop(site_accuracies, site_test_counts, max(SETTLED_ROUND, math.ceil(n_rounds / 2)))


def run_seed(job, work_dir):
    """{run name: figures} for one split: both baselines, then each variant x communication."""
    config = {**job["config"], "seed": 42 + job["seed"]}
    inputs, labels = DATASETS[job["dataset"]]()
    write_setting(inputs, labels, job["split"], job["sites"], job["seed"], config, work_dir)
    results = {"central": run_federation(work_dir / "central", {}),
               "central-steps": run_federation(work_dir / "central-steps", {"max_iter": 1, "epochs": 1})}
    for variant, variant_overrides in job["variants"].items():
        for communication in job["communications"]:
            overrides = {**variant_overrides, "communication": communication}
            results[f"{variant}/{communication}"] = run_federation(work_dir / "federated", overrides)
    return results


def _run_one(job):
    torch.set_num_threads(1)  # LeNet on batches of 32: one thread per run is fastest
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work_dir:
        results = run_seed(job, Path(work_dir))
    print(f"  {job['dataset']} {setting_name(job['split'], job['sites'])} seed {job['seed']}: "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return results


def summarize(values):
    return {"mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "runs": values}


def run_figures(per_seed, run):
    """One run's figures over the seeds, with its gaps to both baselines (seed by seed)."""
    values = {figure: [] for figure in FIGURES}
    stopped = [seed_results[run]["stopped"] for seed_results in per_seed if "stopped" in seed_results[run]]
    for seed_results in per_seed:
        result = seed_results[run]
        if "stopped" in result or any("stopped" in seed_results[base] for base in ("central", "central-steps")):
            continue
        values["accuracy"].append(result["accuracy"])
        values["gap_central"].append(result["accuracy"] - seed_results["central"]["accuracy"])
        values["gap_central_steps"].append(result["accuracy"] - seed_results["central-steps"]["accuracy"])
        values["max_drop"].append(result["max_drop"])
        values["late_drop"].append(result["late_drop"])
        values["train_loss"].append(result["train_loss"])
        values["bytes_per_round"].append(result["bytes_per_round"])
    if not values["accuracy"]:
        return {"stopped": stopped}
    return {"stopped": stopped, **{figure: summarize(figure_values) for figure, figure_values in values.items()}}


def make_jobs(args_grid, n_seeds, config, variants, communications):
    return [{"dataset": dataset, "split": split, "sites": sites, "seed": seed, "config": config,
             "variants": variants, "communications": communications}
            for dataset, split, sites in args_grid for seed in range(n_seeds)]


def run_benchmark(grid, n_seeds, config, variants, communications=("float32",), jobs=2):
    """Every (dataset, split, sites, seed) in its own process, `jobs` at a time; figures over
    the seeds. `grid`: (dataset, split, sites) triples; `variants`: {name: config overrides}."""
    job_list = make_jobs(grid, n_seeds, config, variants, communications)
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        outcomes = pool.map(_run_one, job_list)
    by_key = {(j["dataset"], j["split"], j["sites"], j["seed"]): outcome for j, outcome in zip(job_list, outcomes)}
    datasets = {}
    for dataset, split, sites in grid:
        per_seed = [by_key[dataset, split, sites, seed] for seed in range(n_seeds)]
        datasets.setdefault(dataset, {})[setting_name(split, sites)] = {
            run: run_figures(per_seed, run) for run in per_seed[0]}
    return {"seeds": n_seeds, "variants": variants, "config": config, "datasets": datasets}


def table(results):
    lines = [f"{'dataset':<8} {'setting':<16} {'run':<22} {'accuracy %':>14} {'vs central':>14} "
             f"{'vs equal steps':>14} {'max drop':>9} {'late drop':>9} {'train loss':>10}"]
    for dataset, settings in results["datasets"].items():
        for setting, runs in settings.items():
            for run, figures in runs.items():
                if "accuracy" not in figures:
                    lines.append(f"{dataset:<8} {setting:<16} {run:<22} stopped in every seed: {figures['stopped'][0]}")
                    continue
                cells = [f"{100 * figures[f]['mean']:>+7.2f} +-{100 * figures[f]['std']:<4.2f}"
                         for f in ("gap_central", "gap_central_steps")]
                accuracy = figures["accuracy"]
                lines.append(f"{dataset:<8} {setting:<16} {run:<22} {100 * accuracy['mean']:>6.2f} +-"
                             f"{100 * accuracy['std']:<5.2f} {cells[0]:>14} {cells[1]:>14} "
                             f"{100 * figures['max_drop']['mean']:>9.2f} {100 * figures['late_drop']['mean']:>9.2f} "
                             f"{figures['train_loss']['mean']:>10.3f}"
                             + (f"  ({len(figures['stopped'])} seed(s) stopped: {figures['stopped'][0]})"
                                if figures["stopped"] else ""))
    return "\n".join(lines)


def estimate(grid, n_seeds, config, variants, communications):
    """Seconds one federated run takes (the first of the grid, one seed), and the grid's
    estimated wall time: every run times its sites' share of the data, over `jobs` processes."""
    dataset, split, sites = grid[0]
    job = make_jobs([grid[0]], 1, config, {}, communications)[0]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work_dir:
        run_seed(job, Path(work_dir))  # the two baselines, each trained on all the data
    per_baseline = (time.perf_counter() - started) / 2
    sizes = {name: len(DATASETS[name]()[1]) for name in {d for d, _, _ in grid}}
    per_sample = per_baseline / sizes[dataset]  # a federated run trains on all data too
    # per job: central, central-steps (1/sites of the steps), every variant x communication
    total = sum(per_sample * sizes[d] * (1 + 1 / k + len(variants) * len(communications))
                for d, _, k in grid) * n_seeds
    return per_baseline, total


def parse_grid(parser, args):
    """(dataset, split, sites) triples from the comma-separated flags; unknown names refused."""
    datasets, splits = args.datasets.split(","), args.splits.split(",")
    # none: the two baselines alone (e.g. a centralized recipe with another schedule or batch)
    variants = [] if args.variants == "none" else args.variants.split(",")
    communications = args.communications.split(",")
    for names, known in ((datasets, DATASETS), (splits, SPLITS), (variants, VARIANTS),
                         (communications, COMMUNICATIONS)):
        unknown = [name for name in names if name not in known]
        if unknown:
            parser.error(f"unknown {unknown}; known: {', '.join(known)}")
    sites = [int(n) for n in args.sites.split(",")]
    grid = [(dataset, split, n) for dataset in datasets for split in splits for n in sites]
    return grid, {v: VARIANTS[v] for v in variants}, communications


def run_config(args):
    """The sample's config.yml with --rounds, --epochs, --batch-size, --logit-adjustment,
    --learning-rate-schedule and --model where given: every run of the grid (both baselines and
    the federations) uses it; a variant's own keys win. --model becomes an absolute path, which
    write_setting's `SAMPLE / "generic" / model` leaves as it is. `model_ema` is 0 unless a variant
    names it (the app's default, auto, depends on --epochs): the baselines and the variants without
    an average were measured so, and every table's command gives its figures again."""
    model = str(args.model.resolve()) if args.model else None
    overrides = {"max_iter": args.rounds, "epochs": args.epochs, "batch_size": args.batch_size,
                 "logit_adjustment": args.logit_adjustment, "learning_rate_schedule": args.learning_rate_schedule,
                 "model": model}
    return {**sample_config(), "model_ema": 0, **{key: value for key, value in overrides.items() if value is not None}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--splits", default=",".join(SPLITS))
    parser.add_argument("--sites", default=",".join(map(str, SITES)))
    parser.add_argument("--variants", default=",".join(RULES), help="comma-separated VARIANTS, or none: the baselines alone")
    parser.add_argument("--communications", default="float32")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, help="max_iter of every run (default: the sample's)")
    parser.add_argument("--epochs", type=float, help="epochs per round of every run, 0.5: half a pass (default: the sample's)")
    parser.add_argument("--batch-size", type=int, help="batch_size of every run (default: the sample's)")
    parser.add_argument("--logit-adjustment", type=float,
                        help="logit_adjustment of every run (default: the app's, auto); 0 reproduces the tables "
                             "measured before it existed")
    parser.add_argument("--learning-rate-schedule", choices=("constant", "cosine"),
                        help="learning_rate_schedule of every run (default: the app's)")
    parser.add_argument("--model", type=Path, help="model .py (class Model) of every run (default: the sample's LeNet)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    parser.add_argument("--estimate", action="store_true", help="time one run, estimate the grid, stop")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.model and not args.model.is_file():
        parser.error(f"--model {args.model}: file not found")
    grid, variants, communications = parse_grid(parser, args)
    config = run_config(args)
    if args.estimate:
        one_run, total = estimate(grid, args.seeds, config, variants, communications)
        print(f"one run on all of {grid[0][0]}: {one_run:.1f} s; {len(grid)} settings x {args.seeds} seeds x "
              f"(2 baselines + {len(variants) * len(communications)} runs): about "
              f"{total / 60 / args.jobs:.0f} min with --jobs {args.jobs}")
        return
    started = time.perf_counter()
    results = run_benchmark(grid, args.seeds, config, variants, communications, jobs=args.jobs)
    results["seconds"] = time.perf_counter() - started
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
