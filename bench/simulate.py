"""Run a federation in one process, with the app's own Site and averaging code.

The testbed runs the real thing (processes, HTTP, the engine) and takes about a minute; the
benchmarks need dozens of runs, so they drive the same local work (`federation.site.Site`,
`federation.aggregate.federated_average`) in the order the states do, without transport.
"""
import shutil
import tempfile
from pathlib import Path

import yaml

from federation.aggregate import federated_average
from federation.site import Site
from federation.summary import federation_round


def site_dirs(client_dirs, generic_dir, overrides, work_dir):
    """Merge each client dir with the generic dir (as the testbed does) and apply `overrides`."""
    config = yaml.safe_load((Path(generic_dir) / "config.yml").read_text())
    section = config.get("fc_quantization", config)
    section.update(overrides)
    merged = []
    for index, client_dir in enumerate(client_dirs, start=1):
        target = Path(work_dir) / f"client_{index}"
        shutil.copytree(generic_dir, target)
        shutil.copytree(client_dir, target, dirs_exist_ok=True)
        (target / "config.yml").write_text(yaml.safe_dump({"fc_quantization": section}))
        merged.append(target)
    return merged


def simulate(client_dirs, generic_dir, overrides=None, quantize=False):
    """Federation-wide figures per round (and int8 accuracy when `quantize`)."""
    with tempfile.TemporaryDirectory() as work_dir:
        sites = [Site.load(d) for d in site_dirs(client_dirs, generic_dir, overrides or {}, work_dir)]
        start = sites[0].update_tensors()
        for site in sites:
            site.load_global(start)
        rows = []
        for _ in range(sites[0].config.max_iter):
            updates, metas = [], []
            for site in sites:
                site.start_round()
                metas.append({**site.train_round(), "n_train": site.n_train})
                updates.append(site.update_tensors())
            averaged = federated_average(updates, [site.n_train for site in sites])
            tests = []
            for site in sites:
                site.load_global(averaged)
                tests.append(site.evaluate_global())
            rows.append(federation_round(len(rows) + 1, metas, tests))
        result = {"rounds": rows, "fp32_accuracy": rows[-1]["test_accuracy"]}
        if quantize:
            stats = [site.calibration_stats() for site in sites]
            merged = Site.merge_calibration(stats)
            tests = []
            for site in sites:
                site.convert(merged)
                tests.append({**site.final_results(), "n_test": site.test_info.n})
            total = sum(t["n_test"] for t in tests)
            result["int8_accuracy"] = sum(t["int8"]["accuracy"] * t["n_test"] for t in tests) / total
            result["fp32_accuracy"] = sum(t["fp32"]["accuracy"] * t["n_test"] for t in tests) / total
        return result
