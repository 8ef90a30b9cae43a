"""python -m tools.compare_results A B: do two runs' outputs hold the same figures and models?

For every client_<i>/ in A and B: metrics.json equal except what a run cannot repeat (compute
seconds, latencies, site ids), model_fp32.pt equal tensor for tensor, and model_int8.pt equal
value for value (integer weights, scales, zero points: tests.e2e_helpers.int8_tensors).
Exits 0 when everything matches; prints each difference otherwise.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from quant._ao import quiet
from tests.e2e_helpers import int8_tensors

# Compute times and latencies, site ids, and the byte counts that depend on how many digits
# those take (the `results` report carries them, so its size, the total and, under secure
# aggregation, the totals in `secure_bytes` vary by a few bytes); any `*_seconds`.
UNREPEATABLE = {"seconds", "latency_ms", "id", "results", "total", "secure_bytes"}


def comparable(value):
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items()
                if k not in UNREPEATABLE and not k.endswith("_seconds")}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def differences(first, second, path=""):
    if isinstance(first, dict) and isinstance(second, dict):
        for key in sorted(set(first) | set(second)):
            yield from differences(first.get(key), second.get(key), f"{path}.{key}")
    elif isinstance(first, list) and isinstance(second, list) and len(first) == len(second):
        for index, (a, b) in enumerate(zip(first, second)):
            yield from differences(a, b, f"{path}[{index}]")
    elif first != second:
        yield f"{path}: {first!r} != {second!r}"


def tensors_differ(first, second):
    if first.keys() != second.keys():
        return [f"keys differ: {sorted(set(first) ^ set(second))[:5]}"]
    return [key for key in first if (not torch.equal(first[key], second[key])
                                     if isinstance(first[key], torch.Tensor) else first[key] != second[key])]


def compare_site(first, second):
    problems = [f"metrics.json{line}" for line in differences(
        comparable(json.loads((first / "metrics.json").read_text())),
        comparable(json.loads((second / "metrics.json").read_text())))]
    fp32 = [torch.load(site / "model_fp32.pt", weights_only=True) for site in (first, second)]
    problems += [f"model_fp32.pt {key}" for key in tensors_differ(*fp32)]
    with quiet():
        int8 = [int8_tensors(torch.jit.load(str(site / "model_int8.pt"))) for site in (first, second)]
    problems += [f"model_int8.pt {key}" for key in tensors_differ(*int8)]
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.compare_results", description=__doc__)
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args(argv)
    sites = sorted(site.name for site in args.first.glob("client_*"))
    if not sites or sites != sorted(site.name for site in args.second.glob("client_*")):
        print(f"the two runs have different sites: {sites}")
        return 1
    failed = False
    for name in sites:
        problems = compare_site(args.first / name, args.second / name)
        print(f"{name}: " + ("identical figures and models" if not problems else f"{len(problems)} differences"))
        for problem in problems[:20]:
            print(f"  {problem}")
        failed = failed or bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
