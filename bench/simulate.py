"""Run a federation in one process, through exactly the production path minus transport.

The testbed runs the real thing (processes, HTTP, the engine) and takes about a minute; the
benchmarks need dozens of runs, so they call what the states call, in the states' order: each
`Site` makes and reads its messages as bytes, the `Coordinator` decodes, checks, averages and
steps. Only the controller's relaying is left out. Also: the bundled sample, pooled.
"""
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from federation.coordinator import Coordinator
from federation.secure import SecureCoordinator, SecureSite, Sum
from federation.selection import selection_report
from federation.site import Site
from inputs.config import APP_KEY, CONFIG_FILE, read_app_section
from testbed.relay import fixed_point_sum
from testbed.site import merge_input_dir

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"
SAMPLE_GENERIC = SAMPLE / "generic"
SAMPLE_CLIENTS = sorted(SAMPLE.glob("client_*"))


def sample_config():
    """The bundled sample's settings (the `fc_quantization` section of its config.yml)."""
    return read_app_section(SAMPLE_GENERIC / CONFIG_FILE)


def pooled_sample():
    """(inputs, labels) of all 5,000 sample digits: every site's train and test tensors."""
    parts = [torch.load(path, weights_only=True) for path in sorted(SAMPLE.glob("client_*/*_dataset.pth"))]
    return torch.cat([inputs for inputs, _ in parts]), torch.cat([labels for _, labels in parts])


def site_dirs(client_dirs, generic_dir, overrides, work_dir):
    """Merge each client dir with the generic dir (as the testbed does) and apply `overrides`."""
    section = {**read_app_section(Path(generic_dir) / CONFIG_FILE), **overrides}
    merged = []
    for index, client_dir in enumerate(client_dirs, start=1):
        target = Path(work_dir) / f"client_{index}"
        merge_input_dir(client_dir, generic_dir, target)
        (target / CONFIG_FILE).write_text(yaml.safe_dump({APP_KEY: section}))
        merged.append(target)
    return merged


def load_sites(client_dirs, generic_dir, overrides=None):
    """Site objects, loaded as the `initial` state does (the inputs are read into memory)."""
    with tempfile.TemporaryDirectory() as work_dir:
        return [Site.load(d) for d in site_dirs(client_dirs, generic_dir, overrides or {}, work_dir)]


def _pieces(messages):
    """What the coordinator's gather returns: (sender, bytes) in client order; the senders are
    the sites' numbers from 1, as the testbed's client_<i>."""
    return list(enumerate(messages, start=1))


def run_rounds(sites):
    """The federated rounds as the states run them: federation rows and bytes per round."""
    if sites[0].config.secure_aggregation:
        return run_rounds_secure(sites)
    coordinator = Coordinator(sites[0])
    coordinator.check_summaries(_pieces(site.summary_message() for site in sites))
    start = coordinator.first_global()
    for site in sites:
        site.receive_global("coordinator", start)
    uplink, downlink = [], []
    for round_number in range(1, sites[0].config.max_iter + 1):
        updates = []
        for site in sites:
            site.start_round()
            updates.append(site.train_round())
        next_global = coordinator.aggregate(_pieces(updates))
        uplink += map(len, updates)
        downlink.append(len(next_global))
        for site in sites:
            site.receive_global("coordinator", next_global)
        coordinator.record_round(round_number, _pieces(site.evaluate_global() for site in sites))
        if follow_decision(coordinator, sites):
            break
    rows = coordinator.rounds
    return {**kept_figures(rows, sites[0]),
            "site_test_accuracy": [[row["test_accuracy"] for row in site.rounds] for site in sites],
            "site_test_counts": [site.inputs.test_info.n for site in sites],
            "update_bytes": statistics.mean(uplink), "global_bytes": statistics.mean(downlink),
            # What crosses the network per round: every site's update + the broadcast to each.
            "bytes_per_round": (sum(uplink) + len(sites) * sum(downlink)) / len(downlink)}


def follow_decision(coordinator, sites):
    """The coordinator's `round_<r>` decision at every site (as the states do); whether training
    is done (max_iter reached, or stopped early)."""
    decision = coordinator.decide()
    for site in sites:
        site.follow_decision("coordinator", decision)
    return sites[0].training_done


def kept_figures(rows, site):
    """The rounds, and the test accuracy of the round whose model is quantized and written."""
    selection = selection_report(site.decision, site.config.max_iter, site.config.model_ema)
    return {"rounds": rows, "accuracy": rows[selection["kept_round"] - 1]["test_accuracy"],
            "last_accuracy": rows[-1]["test_accuracy"], "selection": selection}


def secure_sum(contributions):
    """What the controller delivers for one SMPC memo: every site's JSON summed in fixed point
    (testbed.relay.fixed_point_sum: smpc_sum's result without making the shares); (the Sum,
    bytes sent)."""
    payloads = [json.dumps(contribution.vector).encode() for contribution in contributions]
    (exponent,) = {contribution.exponent for contribution in contributions}
    (memo,) = {contribution.memo for contribution in contributions}
    return Sum(memo, fixed_point_sum(payloads, exponent)), sum(map(len, payloads))


def run_rounds_secure(sites):
    """run_rounds under secure_aggregation: the states' secure path (Site -> SecureSite
    contributions -> fixed-point sum -> SecureCoordinator), transport left out."""
    secures = [SecureSite(site, len(sites)) for site in sites]
    coordinator = SecureCoordinator(Coordinator(sites[0]), len(sites))
    coordinator.check_summaries(_pieces(secure.summary_message() for secure in secures))
    counts, _ = secure_sum([secure.counts() for secure in secures])
    start = coordinator.first_global(counts)
    for site, secure in zip(sites, secures):
        secure.receive_totals(site.receive_global("coordinator", start))
    uplink, downlink, seconds = [], [], []
    for round_number in range(1, sites[0].config.max_iter + 1):
        for site in sites:
            site.start_round()
        step_uplink, step_downlink = train_on_noisy_sums(sites, secures, coordinator, round_number) \
            if secures[0].distributed_dp else (0, 0)
        contributions = [secure.update(f"update_{round_number}") for secure in secures]
        started = time.perf_counter()
        total, sent = secure_sum(contributions)
        next_global = coordinator.aggregate(total)
        seconds.append(time.perf_counter() - started)
        uplink.append((sent + step_uplink) / len(sites))
        downlink.append(len(next_global) + step_downlink)
        for site in sites:
            site.receive_global("coordinator", next_global)
        tests, _ = secure_sum([secure.test(f"test_{round_number}") for secure in secures])
        coordinator.record_round(round_number, tests)
        if follow_decision(coordinator, sites):
            break
    rows = coordinator.rounds
    sites[0].secure_run = (secures, coordinator)  # for quantize_sites
    return {**kept_figures(rows, sites[0]),
            "update_bytes": statistics.mean(uplink), "global_bytes": statistics.mean(downlink),
            "bytes_per_round": (len(sites) * sum(uplink) + len(sites) * sum(downlink)) / len(downlink),
            "sum_seconds_per_round": statistics.mean(seconds)}


def train_on_noisy_sums(sites, secures, coordinator, round_number):
    """dp.noise distributed: the round's DP-SGD steps, one secure sum each (as
    federation.channel.SecureChannel runs them); the bytes the sites sent and the broadcasts'."""
    uplink = downlink = 0
    for step in range(1, secures[0].dp_plan.steps_per_round + 1):
        total, sent = secure_sum([secure.dp_sum(f"dp_sum_{round_number}_{step}") for secure in secures])
        model = coordinator.step_on_noisy_sum(total, round_number)
        for site in sites:
            site.receive_global("coordinator", model)
        uplink, downlink = uplink + sent, downlink + len(model)
    return uplink, downlink


def convert_and_export(sites, qparams):
    """Every site converts with the federation's statistics, then writes its int8 files and
    measures each in its own runtime (in a temporary dir), as the app's states do."""
    with tempfile.TemporaryDirectory() as output:
        for index, site in enumerate(sites, start=1):
            site.convert("coordinator", qparams)
            site.export_int8(Path(output) / f"client_{index}")


def quantize_sites_secure(sites):
    secures, coordinator = sites[0].secure_run
    ranges, _ = secure_sum([secure.calibration_range() for secure in secures])
    grid = coordinator.calibration_grid(ranges, sites[0].own_stats)
    for secure in secures:
        secure.receive_grid("coordinator", grid)
    histograms, _ = secure_sum([secure.calibration() for secure in secures])
    qparams = coordinator.merge_calibration(histograms, sites[0].own_stats)
    convert_and_export(sites, qparams)
    results, _ = secure_sum([secure.results() for secure in secures])
    return sites[0].codec.decode_report("coordinator", coordinator.final(results))["figures"]


def quantize_sites(sites):
    """Federated calibration (post_static) or the QAT model, converted at every site; the
    federation-wide fp32 and int8 figures."""
    if sites[0].config.secure_aggregation:
        return quantize_sites_secure(sites)
    coordinator = Coordinator(sites[0])
    calibration = _pieces(site.calibration_message() for site in sites)
    qparams = coordinator.merge_calibration(calibration, sites[0].own_stats)
    convert_and_export(sites, qparams)
    final = coordinator.final(_pieces(site.results_message() for site in sites))
    return sites[0].codec.decode_report("coordinator", final, "final")["figures"]


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
