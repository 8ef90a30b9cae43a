"""Run a federation in one process, with the app's own Site, averaging and message code.

The testbed runs the real thing (processes, HTTP, the engine) and takes about a minute; the
benchmarks need dozens of runs, so they drive the same local work in the order the states do
(`Site`, `federated_average`, `ServerOptimizer`, messages through `federation.payload`, int8
deltas when configured), without transport. Also: the bundled sample, pooled, for re-splitting.
"""
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
import yaml

from federation import payload
from federation.aggregate import federated_average
from federation.server_optimizer import ServerOptimizer
from federation.site import Site
from federation.summary import federation_results, federation_round

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"
SAMPLE_GENERIC = SAMPLE / "generic"
SAMPLE_CLIENTS = sorted(SAMPLE.glob("client_*"))


def sample_config():
    """The bundled sample's settings (the `fc_quantization` section of its config.yml)."""
    document = yaml.safe_load((SAMPLE_GENERIC / "config.yml").read_text())
    return dict(document.get("fc_quantization", document))


def pooled_sample():
    """(inputs, labels) of all 5,000 sample digits: every site's train and test tensors."""
    parts = [torch.load(path, weights_only=True) for path in sorted(SAMPLE.glob("client_*/*_dataset.pth"))]
    return torch.cat([inputs for inputs, _ in parts]), torch.cat([labels for _, labels in parts])


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


def load_sites(client_dirs, generic_dir, overrides=None):
    """Site objects, loaded as the `initial` state does (the inputs are read into memory)."""
    with tempfile.TemporaryDirectory() as work_dir:
        return [Site.load(d) for d in site_dirs(client_dirs, generic_dir, overrides or {}, work_dir)]


def run_rounds(sites):
    """The federated rounds as the states run them: federation rows and bytes per round."""
    coordinator = sites[0]
    server = ServerOptimizer.from_config(coordinator.config)
    start = payload.encode(coordinator.update_tensors(), {})
    for site in sites:
        site.load_global(payload.decode(start, "coordinator")[0])
    rows, uplink, downlink = [], [], []
    for round_number in range(1, coordinator.config.max_iter + 1):
        updates, metas = [], []
        for index, site in enumerate(sites):
            site.start_round()
            meta = {**site.train_round(), "n_train": site.n_train}
            data = payload.encode(site.update_message(), meta)
            uplink.append(len(data))
            updates.append(coordinator.read_message(payload.decode(data, index)[0], index))
            metas.append(meta)
        averaged = federated_average(updates, [meta["n_train"] for meta in metas])
        next_global = server.step(coordinator.global_tensors, averaged, coordinator.parameter_names())
        data = payload.encode(coordinator.global_message(next_global), {})
        downlink.append(len(data))
        tests = []
        for site in sites:
            site.load_global(site.read_message(payload.decode(data, "coordinator")[0], "coordinator"))
            tests.append(site.evaluate_global())
        rows.append(federation_round(round_number, metas, tests))
    return {"rounds": rows, "accuracy": rows[-1]["test_accuracy"],
            "update_bytes": statistics.mean(uplink), "global_bytes": statistics.mean(downlink),
            # What crosses the network per round: every site's update + the broadcast to each.
            "bytes_per_round": (sum(uplink) + len(sites) * sum(downlink)) / len(downlink)}


def quantize_sites(sites):
    """Federated calibration (post_static) or the QAT model, converted at every site; the
    federation-wide fp32 and int8 figures."""
    merged = Site.merge_calibration([site.calibration_stats() for site in sites])
    for site in sites:
        site.convert(merged)
    return federation_results([site.final_results() for site in sites])


def simulate(client_dirs, generic_dir, overrides=None, quantize=False):
    """One federation: its rounds, and with `quantize` the fp32/int8 figures (`figures`)."""
    sites = load_sites(client_dirs, generic_dir, overrides)
    result = run_rounds(sites)
    result["fp32_accuracy"] = result["accuracy"]
    if quantize:
        result["figures"] = quantize_sites(sites)
        result["fp32_accuracy"] = result["figures"]["fp32"]["accuracy"]
        result["int8_accuracy"] = result["figures"]["int8"]["accuracy"]
    return result
