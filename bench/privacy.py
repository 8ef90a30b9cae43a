"""What privacy costs on the sample: secure aggregation and DP-SGD, federated and centralized.

    python -m bench.privacy [--seeds 3] [--epsilons 1,3,8] [--delta 1e-5] [--max-grad-norm 1.0]
        [--rows plain,secure,dp,distributed,distributed-all] [--backend xnnpack]
        [--out bench/results/privacy.json]

Rows (the sample's 3 sites and its config.yml: LeNet, batch 32, Adam lr 0.005, 5 rounds x 2
epochs, post_static x86; `--backend xnnpack`: every row with the PT2E backend, its int8
files run in their own runtimes):
- `plain`: the app as it is; `secure`: secure_aggregation: true (every summed message through
  the controller's fixed-point SMPC, simulated here with testbed.relay.fixed_point_sum:
  smpc_sum's result without making the shares);
- `dp-<eps>`: dp {epsilon, delta, max_grad_norm} at every site (plain aggregation; DP-SGD's
  own defaults: SGD momentum 0.9, lr 0.05, expected Poisson batch 128), beside
  `central-dp-<eps>`: DP-SGD on the union of the three sites' train sets (one site holding it
  all, the same 10 epochs at the same epsilon): what DP costs by itself, without federation;
- `dp-<eps>-distributed`: dp noise: distributed under secure_aggregation (DP-SGD on the union,
  each step one secure sum of the sites' clipped gradient sums, each with its share of the
  noise): the same mechanism as `central-dp-<eps>`, run federated;
- `dp-<eps>-distributed-all`: the same with dp colluding_sites: all (each site adds the whole
  noise, so its own contribution is private against every other party, as with local noise).

Each row: federation-wide fp32 and int8 test accuracy (all 1,000 test digits), bytes that
cross the network per round, wall seconds per round (training included; the machine's load
shows in it), and for DP the largest epsilon any site spent. Runs in one process through the
app's own Site / Coordinator / SecureSite / SecureCoordinator (bench/simulate.py).
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.simulate import SAMPLE_CLIENTS, SAMPLE_GENERIC, load_sites, quantize_sites, run_rounds

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "privacy.json"


def union_client(work_dir):
    """One client dir with every sample site's train set and every test set."""
    target = Path(work_dir) / "union"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("train_dataset.pth", "test_dataset.pth"):
        parts = [torch.load(client / name, weights_only=True) for client in SAMPLE_CLIENTS]
        torch.save((torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])), target / name)
    return target


def run_one(client_dirs, overrides):
    sites = load_sites(client_dirs, SAMPLE_GENERIC, overrides)
    started = time.perf_counter()
    result = run_rounds(sites)
    seconds_per_round = (time.perf_counter() - started) / len(result["rounds"])
    figures = quantize_sites(sites)
    spent = [site.dp_report["epsilon_spent"] for site in sites if site.dp_report]
    return {"fp32": figures["fp32"]["accuracy"], "int8": figures["int8"]["accuracy"],
            "bytes_per_round": result["bytes_per_round"], "seconds_per_round": seconds_per_round,
            "epsilon_spent": max(spent) if spent else None,
            # secure: JSON, fixed-point secret-shared sum and decoding of the update (per round)
            "sum_seconds_per_round": result.get("sum_seconds_per_round"),
            "noise_multiplier": sites[0].dp_report["noise_multiplier"] if sites[0].dp_report else None}


def mean_row(runs):
    row = {}
    for key in runs[0]:
        values = [run[key] for run in runs if run[key] is not None]
        row[key] = statistics.mean(values) if values else None
        if key in ("fp32", "int8") and len(values) > 1:
            row[key + "_std"] = statistics.stdev(values)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--rows", default="plain,secure,dp,distributed,distributed-all")
    parser.add_argument("--backend", default="x86", help="every row's backend (the sample's: x86)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    wanted = args.rows.split(",")
    plans = []  # (row name, client dirs or "union", overrides)
    if "plain" in wanted:
        plans.append(("plain", "sites", {}))
    if "secure" in wanted:
        plans.append(("secure", "sites", {"secure_aggregation": True}))
    if "dp" in wanted:
        for epsilon in (float(e) for e in args.epsilons.split(",")):
            dp = {"epsilon": epsilon, "delta": args.delta, "max_grad_norm": args.max_grad_norm}
            plans.append((f"dp-{epsilon:g}", "sites", {"dp": dp}))
            plans.append((f"central-dp-{epsilon:g}", "union", {"dp": dp}))
    if "distributed" in wanted:
        for epsilon in (float(e) for e in args.epsilons.split(",")):
            dp = {"epsilon": epsilon, "delta": args.delta, "max_grad_norm": args.max_grad_norm, "noise": "distributed"}
            plans.append((f"dp-{epsilon:g}-distributed", "sites", {"dp": dp, "secure_aggregation": True}))
    if "distributed-all" in wanted:
        for epsilon in (float(e) for e in args.epsilons.split(",")):
            dp = {"epsilon": epsilon, "delta": args.delta, "max_grad_norm": args.max_grad_norm, "noise": "distributed",
                  "colluding_sites": "all"}
            plans.append((f"dp-{epsilon:g}-distributed-all", "sites", {"dp": dp, "secure_aggregation": True}))
    rows = {}
    with tempfile.TemporaryDirectory() as work_dir:
        union = [union_client(work_dir)]
        for name, clients, overrides in plans:
            runs = []
            for seed in range(args.seeds):
                client_dirs = union if clients == "union" else SAMPLE_CLIENTS
                runs.append(run_one(client_dirs, {**overrides, "backend": args.backend, "seed": 42 + seed}))
            rows[name] = {**mean_row(runs), "seeds": args.seeds}
            print(format_row(name, rows[name]), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)  # after every row: partial runs count
            args.out.write_text(json.dumps({"rows": rows, "backend": args.backend, "delta": args.delta,
                                            "max_grad_norm": args.max_grad_norm}, indent=2))
    print(f"written to {args.out}")


def format_row(name, row):
    epsilon = "" if row["epsilon_spent"] is None else f"  eps spent {row['epsilon_spent']:.2f}"
    return (f"{name:20s} fp32 {100 * row['fp32']:6.2f} %  int8 {100 * row['int8']:6.2f} %  "
            f"{row['bytes_per_round'] / 1e6:6.2f} MB/round  {row['seconds_per_round']:6.1f} s/round{epsilon}")


if __name__ == "__main__":
    main()
