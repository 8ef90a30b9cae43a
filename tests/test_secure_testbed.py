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


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    clients, generic = make_tiny_federation(root, secure_aggregation=True, epochs=1, max_iter=2,
                                            dp={"epsilon": 8, "noise": "distributed", "batch_size": 96})
    result = testbed.run_federation(clients, generic, root / "out", quiet=True, timeout=110)
    assert result.ok, result.message
    return result


def test_distributed_dp_steps_reach_the_coordinator_only_as_sums(distributed_run):
    """dp noise: distributed: every DP-SGD step is a secure sum (each site's noise share alone
    would not protect it); the sites receive the coordinator's model after each step."""
    result = distributed_run
    steps = read_metrics(result.site_outputs[0])["privacy"]["dp"]["steps"]
    assert steps == 2 * round(259 / 96)
    step_memos = {f"dp_sum_{r}_{s}" for r in (1, 2) for s in range(1, steps // 2 + 1)}
    coordinator = result.received[1]
    aggregates = Counter(d["memo"] for d in coordinator if d["smpc_aggregate"])
    assert aggregates == Counter(SUMMED | step_memos)
    assert {d["memo"] for d in coordinator if d["sender"] != 1} == {"summary"}
    models = {memo.replace("dp_sum", "dp_model") for memo in step_memos}
    for site in (2, 3):
        assert {d["memo"] for d in result.received[site]} == BROADCAST | models
    int8 = [int8_tensors(torch.jit.load(site / "model_int8.pt")) for site in result.site_outputs]
    for other in int8[1:]:
        assert_identical(int8[0], other)
    for site in result.site_outputs:
        privacy = read_metrics(site)["privacy"]
        assert privacy["dp"]["noise"] == "distributed" and 0 < privacy["dp"]["epsilon_spent"] <= 8 * 1.001
        assert privacy["secure_messages"]["dp_sum_1"]["sums"] == steps // 2
        assert "Epsilon if every other site and the coordinator collude" in (site / "report.html").read_text()
