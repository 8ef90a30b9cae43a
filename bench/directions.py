"""How honest sites' updates relate to each other, against random noise: the figures behind
`min_cosine`'s default (docs/robustness.md, federation.robust.find_random_updates).

    python -m bench.directions [--splits iid,dirichlet-0.5,dirichlet-0.1,sample] [--seeds 0,1]
        [--epochs 2] [--rounds 5] [--aggregation auto] [--batch-size B] [--out bench/results/directions.json] [--jobs 2]

Honest federations only, the noise and distance checks switched off so that every round
runs: the sample's 5,000 digits re-split into 5 sites (`testbed.split`: IID, Dirichlet 0.5
and 0.1 label skew; split seed s, config seed 42 + s), and `sample` (the bundled 3 sites as
they are, the default run). Every update of every round is recorded as it leaves its site.
Two tables per run. The first: each honest update's cosine with the coordinate-wise median of
the other sites' changes (how far apart sites point), and what site 2 would have measured
sending random noise of its update's norm, or its update sign-flipped. The second, what the
random-direction check judges: each change's largest |cosine| with another site's change, its
own change the round before or the federation's last step, honest against noise (fresh each
round), and how many of each the check flags at the default min_cosine (from round 2: a
site's first update is not judged). `--dataset animals` and `--sites` re-split the animal silhouettes or another number
of sites.
"""
import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.datasets import DATASETS
from bench.simulate import SAMPLE, SAMPLE_CLIENTS, SAMPLE_GENERIC, load_sites, run_rounds, sample_config
from federation import payload, robust
from federation.messages import ModelMessage
from inputs.config import AppConfig
from testbed.split import split_dataset, write_client_dirs

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "directions.json"
SPLITS = {"iid": ("iid", None), "dirichlet-0.5": ("dirichlet", 0.5), "dirichlet-0.1": ("dirichlet", 0.1),
          "sample": (None, None)}
CHECKS_OFF = {"min_cosine": None, "outlier_factor": None}
DEFAULT_MIN_COSINE = AppConfig.min_cosine


def _recording(site, rounds):
    """Wrap site.train_round: rounds[r] = (the global round r started from, every update)."""
    train_round, calls = site.train_round, []

    def recorded():
        previous = ModelMessage.split(site.codec.last_global).weights
        data = train_round()
        tensors, meta = payload.decode(data, "self")
        rounds.setdefault(len(calls), (previous, []))[1].append(ModelMessage.split(tensors, meta).weights)
        calls.append(None)
        return data
    site.train_round = recorded


def _attack_changes(previous, states, generator):
    """Site 2's change replaced by each attack: random noise of its norm (fresh each round), and
    its change sign-flipped."""
    change = robust.update_changes(previous, states)[1]
    noise = torch.randn(change.shape, generator=generator, dtype=torch.float64)
    return {"noise": noise * change.norm() / noise.norm(), "sign_flip_x1": -change}


def _round_cosines(per_round, generator):
    """Per round: the honest cosines against the others' median, each honest change's largest
    |cosine| with another site's change, its own previous one or the federation's last step
    (what the random-direction check judges, robust.largest_cosines), and for each attack on
    site 2 the same two figures."""
    rows, last, last_global = [], None, None
    for previous, states in per_round:
        changes = robust.update_changes(previous, states)
        attacks = _attack_changes(previous, states, generator)
        own_last = last["honest"] if last else [None] * len(changes)
        last_step = robust.update_changes(last_global, [previous])[0] if last_global else None
        row = {"honest": robust.update_cosines(previous, states),
               "honest_largest": robust.largest_cosines(changes, own_last, last_step)}
        for attack, hostile in attacks.items():
            attacked = [changes[0], hostile, *changes[2:]]
            row[attack] = robust.median_cosines(attacked)[1]
            row[attack + "_largest"] = robust.largest_cosines(
                attacked, [own_last[0], last and last[attack], *own_last[2:]], last_step)[1]
        rows.append(row)
        last, last_global = {"honest": changes, **attacks}, previous
    return rows


def run_split(job):
    """One honest federation: per round, the honest cosines and the attacks' cosines."""
    split, seed, epochs, rounds_n, aggregation, dataset, n_sites, batch_size = job
    torch.set_num_threads(1)
    overrides = {**CHECKS_OFF, "epochs": epochs, "max_iter": rounds_n, "seed": 42 + seed, "aggregation": aggregation,
                 **({"batch_size": batch_size} if batch_size else {})}
    with tempfile.TemporaryDirectory() as work_dir:
        clients, generic = _federation(split, seed, Path(work_dir), dataset, n_sites)
        sites = load_sites(clients, generic, overrides)
    recorded = {}
    for site in sites:
        _recording(site, recorded)
    figures = run_rounds(sites)
    rows = _round_cosines(list(recorded.values()), torch.Generator().manual_seed(seed))
    previous, states = next(iter(recorded.values()))
    return {"split": split, "seed": seed, "accuracy": figures["accuracy"],
            "n_weights": robust.update_changes(previous, states)[0].numel(),
            **{key: [row[key] for row in rows] for key in rows[0]}}


def _federation(split, seed, work_dir, dataset, n_sites):
    scheme, alpha = SPLITS[split]
    if scheme is None:
        return SAMPLE_CLIENTS, SAMPLE_GENERIC
    inputs, labels = DATASETS[dataset]()
    splits = split_dataset(inputs, labels, n_sites, scheme=scheme, alpha=alpha or 0.5, seed=seed)
    write_client_dirs(splits, work_dir / "federation", SAMPLE / "generic" / sample_config()["model"], sample_config())
    return sorted((work_dir / "federation").glob("client_*")), work_dir / "federation" / "generic"


def table(runs):
    lines = ["| split | seeds | honest min | honest 5th pct. | honest median | lowest round-1 | noise max abs | "
             "sign flip x-1 max | fp32 acc. |", "|---|---|---|---|---|---|---|---|---|"]
    for split in dict.fromkeys(run["split"] for run in runs):
        mine = [run for run in runs if run["split"] == split]
        honest = sorted(c for run in mine for row in run["honest"] for c in row if c is not None)
        first = min(c for run in mine for c in run["honest"][0] if c is not None)
        noise = max(abs(c) for run in mine for c in run["noise"])
        flip = max(run_flip for run in mine for run_flip in run["sign_flip_x1"])
        accuracy = statistics.mean(run["accuracy"] for run in mine)
        lines.append(f"| {split} | {','.join(str(run['seed']) for run in mine)} | {honest[0]:.3f} | "
                     f"{honest[len(honest) // 20]:.3f} | {statistics.median(honest):.3f} | {first:.3f} | "
                     f"{noise:.3f} | {flip:.3f} | {accuracy:.4f} |")
    return "\n".join(lines + ["", random_direction_table(runs)])


def random_direction_table(runs, min_cosine=DEFAULT_MIN_COSINE):
    """The random-direction check (robust.find_random_updates) on every recorded round: each
    change's largest |cosine| with another site's change, its own previous one or the
    federation's last step, honest against noise, and how many each the check flags at
    min_cosine. A site's first update is not judged: round 1 is shown apart."""
    lines = ["| split | honest lowest, round 2+ | in round | honest lowest, round 1 (not judged) | "
             "noise highest, round 2+ | bound | honest flagged | noise flagged |", "|---|---|---|---|---|---|---|---|"]
    for split in dict.fromkeys(run["split"] for run in runs):
        mine = [run for run in runs if run["split"] == split]
        honest = [(value, r + 2) for run in mine for r, row in enumerate(run["honest_largest"][1:])
                  for value in row if value is not None]
        first = min(value for run in mine for value in run["honest_largest"][0] if value is not None)
        noise = [value for run in mine for value in run["noise_largest"][1:] if value is not None]
        bound = robust.random_direction_bound(min_cosine, mine[0]["n_weights"])
        lowest, lowest_round = min(honest)
        lines.append(f"| {split} | {lowest:.4f} | {lowest_round} | {first:.4f} | {max(noise):.4f} | {bound:.4f} | "
                     f"{sum(value < bound for value, _ in honest)}/{len(honest)} | "
                     f"{sum(value < bound for value in noise)}/{len(noise)} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--splits", default=",".join(SPLITS))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--epochs", type=float, default=2, help="epochs per round (0.5: half an epoch)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--aggregation", default="auto", help="the aggregation rule (config.yml's key)")
    parser.add_argument("--dataset", default="mnist", choices=sorted(DATASETS))
    parser.add_argument("--sites", type=int, default=5, help="sites of the re-split federations")
    parser.add_argument("--batch-size", type=int, default=None, help="the sample's 32 unless given")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    jobs = [(split, seed, args.epochs, args.rounds, args.aggregation, args.dataset, args.sites, args.batch_size)
            for split in args.splits.split(",") for seed in (seeds if SPLITS[split][0] else seeds[:1])]
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        runs = pool.map(run_split, jobs)
    print(table(runs))
    print(f"{time.perf_counter() - started:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"epochs": args.epochs, "rounds": args.rounds, "aggregation": args.aggregation,
                                    "dataset": args.dataset, "sites": args.sites,
                                    "batch_size": args.batch_size, "runs": runs}, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
