"""The real app under secure_aggregation through the testbed (processes, HTTP, the engine, the
controller's SMPC with secret shares): the coordinator receives sums only."""
import json
from collections import Counter

import pytest
import torch

import testbed
from federation import payload
from tests.e2e_helpers import assert_identical, int8_tensors, read_metrics
from tests.privacy_helpers import make_tiny_federation

pytestmark = pytest.mark.timeout(120)
SUMMED = {"counts", "update_1", "update_2", "test_1", "test_2", "calibration_range", "calibration", "results"}
BROADCAST = {"global_0", "global_1", "global_2", "round_1", "round_2", "calibration_grid", "qparams", "final"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("secure")
    clients, generic = make_tiny_federation(root, secure_aggregation=True, epochs=1, max_iter=2)
    summaries = []

    def keep_summaries(sender, receiver, memo, data):
        if memo == "summary":
            summaries.append(payload.decode(data, sender)[1])
        return data

    result = testbed.run_federation(clients, generic, root / "out", quiet=True, timeout=110,
                                    relay_filter=keep_summaries)
    assert result.ok, result.message
    return result, summaries


def test_the_coordinator_receives_only_sums(run):
    result, summaries = run
    coordinator = result.received[1]
    aggregates = [d for d in coordinator if d["smpc_aggregate"]]
    # Every summed message arrives once, as the controller's aggregate in the coordinator's name.
    assert Counter(d["memo"] for d in aggregates) == Counter(SUMMED)
    assert all(d["sender"] == 1 for d in aggregates)
    # From the other sites, in plain, only their input shapes: no update, figures or statistics.
    from_others = [d for d in coordinator if d["sender"] != 1]
    assert {d["memo"] for d in from_others} == {"summary"} and len(from_others) == 2
    assert all(set(summary) == {"input_shape", "n_classes"} for summary in summaries)
    for site in (2, 3):
        assert {d["memo"] for d in result.received[site]} == BROADCAST
        assert {d["sender"] for d in result.received[site]} == {1}
    recorded = json.loads((result.site_outputs[0].parent / "received.json").read_text())
    assert len(recorded["client_1"]) == len(coordinator)


def test_every_site_holds_the_same_int8_model_and_reports_privacy(run):
    result, _ = run
    int8 = [int8_tensors(torch.jit.load(site / "model_int8.pt")) for site in result.site_outputs]
    for other in int8[1:]:
        assert_identical(int8[0], other)
    metrics = [read_metrics(site) for site in result.site_outputs]
    assert metrics[0]["federation"] == metrics[1]["federation"] == metrics[2]["federation"]
    assert metrics[0]["federation"]["n_train"] == 259 and metrics[0]["federation"]["n_sites"] == 3
    for site_metrics, site in zip(metrics, result.site_outputs):
        privacy = site_metrics["privacy"]
        assert privacy["secure_aggregation"] is True and set(privacy["secure_messages"]) == SUMMED
        assert privacy["secure_bytes"]["json"] > privacy["secure_bytes"]["plain_equivalent"] > 0
        assert "summary" in privacy["plain_messages"]
        assert "id='secure-messages'" in (site / "report.html").read_text()
