"""How far apart honest sites' updates point: the figures behind `min_cosine`'s default
(docs/attacks.md, federation.robust.update_cosines).

    python -m bench.directions [--splits iid,dirichlet-0.5,dirichlet-0.1,sample] [--seeds 0,1]
        [--epochs 2] [--rounds 5] [--out bench/results/directions.json] [--jobs 2]

Honest federations only, the direction and distance checks switched off so that every round
runs: the sample's 5,000 digits re-split into 5 sites (`testbed.split`: IID, Dirichlet 0.5
and 0.1 label skew; split seed s, config seed 42 + s), and `sample` (the bundled 3 sites as
they are, the default run). Every update of every round is recorded as it leaves its site;
per split the table gives the honest cosines (each update's change against the coordinate-
wise median of the other sites' changes, as the coordinator measures it), and what a site
sending random noise of its own update's norm, or its update sign-flipped, would have
measured in the same rounds.
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

from bench.simulate import SAMPLE, SAMPLE_CLIENTS, SAMPLE_GENERIC, load_sites, pooled_sample, run_rounds, \
    sample_config
from federation import payload, robust
from federation.messages import ModelMessage
from testbed.split import split_dataset, write_client_dirs

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "directions.json"
SPLITS = {"iid": ("iid", None), "dirichlet-0.5": ("dirichlet", 0.5), "dirichlet-0.1": ("dirichlet", 0.1),
          "sample": (None, None)}
N_SITES = 5
CHECKS_OFF = {"min_cosine": None, "outlier_factor": None}


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


def _round_cosines(previous, states, generator):
    """(honest cosines, noise's, sign flip's): site 2 replaced by each attack in turn."""
    honest = robust.update_cosines(previous, states)
    change = {name: states[1][name].double() - value.double()
              for name, value in previous.items() if value.is_floating_point()}
    norm = math.sqrt(sum(value.square().sum().item() for value in change.values()))
    noise = {name: torch.randn(value.shape, generator=generator, dtype=torch.float64) for name, value in change.items()}
    noise_norm = math.sqrt(sum(value.square().sum().item() for value in noise.values()))
    attacked = {}
    for attack, new_change in (("noise", {n: v * norm / noise_norm for n, v in noise.items()}),
                               ("sign_flip_x1", {n: -v for n, v in change.items()})):
        hostile = {**states[1], **{n: previous[n].double() + v for n, v in new_change.items()}}
        attacked[attack] = robust.update_cosines(previous, [states[0], hostile, *states[2:]])[1]
    return honest, attacked


def run_split(job):
    """One honest federation: per round, the honest cosines and the attacks' cosines."""
    split, seed, epochs, rounds_n = job
    torch.set_num_threads(1)
    overrides = {**CHECKS_OFF, "epochs": epochs, "max_iter": rounds_n, "seed": 42 + seed}
    with tempfile.TemporaryDirectory() as work_dir:
        clients, generic = _federation(split, seed, Path(work_dir))
        sites = load_sites(clients, generic, overrides)
    recorded = {}
    for site in sites:
        _recording(site, recorded)
    figures = run_rounds(sites)
    generator = torch.Generator().manual_seed(seed)
    per_round = [_round_cosines(previous, states, generator) for previous, states in recorded.values()]
    return {"split": split, "seed": seed, "accuracy": figures["accuracy"],
            "honest": [honest for honest, _ in per_round],
            "noise": [attacked["noise"] for _, attacked in per_round],
            "sign_flip_x1": [attacked["sign_flip_x1"] for _, attacked in per_round]}


def _federation(split, seed, work_dir):
    scheme, alpha = SPLITS[split]
    if scheme is None:
        return SAMPLE_CLIENTS, SAMPLE_GENERIC
    inputs, labels = pooled_sample()
    splits = split_dataset(inputs, labels, N_SITES, scheme=scheme, alpha=alpha or 0.5, seed=seed)
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
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--splits", default=",".join(SPLITS))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    jobs = [(split, seed, args.epochs, args.rounds) for split in args.splits.split(",")
            for seed in (seeds if SPLITS[split][0] else seeds[:1])]
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        runs = pool.map(run_split, jobs)
    print(table(runs))
    print(f"{time.perf_counter() - started:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"epochs": args.epochs, "rounds": args.rounds, "runs": runs}, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
