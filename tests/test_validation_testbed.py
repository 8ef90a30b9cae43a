"""keep: best and patience in the real app through the testbed (processes, HTTP, the engine, the
coordinator's round_<r> decisions): training stops early, and every site writes the model of
the round of lowest federation validation loss, the same int8 file everywhere."""
import pytest

import testbed
from tests.e2e_helpers import read_metrics
from tests.privacy_helpers import make_tiny_federation

pytestmark = pytest.mark.timeout(150)
MAX_ITER = 6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    # A learning rate this high makes the tiny federation's round 2 worse than its round 1.
    clients, generic = make_tiny_federation(root, learning_rate=0.3, max_iter=MAX_ITER, keep="best",
                                            patience=1)
    received = []

    def record_memos(sender, receiver, memo, data):
        received.append((receiver, memo))
        return data

    result = testbed.run_federation(clients, generic, root / "out", quiet=True, timeout=140,
                                    relay_filter=record_memos)
    assert result.ok, result.message
    return result, received, [read_metrics(site) for site in result.site_outputs]


def test_patience_stops_training_early(run):
    result, received, metrics = run
    rounds = metrics[0]["federation"]["rounds"]
    assert len(rounds) < MAX_ITER and all(len(m["rounds"]) == len(rounds) for m in metrics)
    selection = metrics[0]["selection"]
    assert selection["stopped_early"] and selection["rounds_run"] == len(rounds)
    assert f"stopped early after round {len(rounds)}" in selection["reason"]
    # The decision reached every other site after each round.
    for site in (2, 3):
        assert [memo for receiver, memo in received if receiver == site and memo.startswith("round_")] == \
            [f"round_{number}" for number in range(1, len(rounds) + 1)]


def test_every_site_writes_the_best_validated_rounds_model(run):
    result, _, metrics = run
    rounds = metrics[0]["federation"]["rounds"]
    losses = [row["validation_loss"] for row in rounds]
    kept = metrics[0]["selection"]["kept_round"]
    assert losses[kept - 1] == min(losses) and kept < len(rounds)
    for site_metrics, site_dir in zip(metrics, result.site_outputs):
        assert site_metrics["selection"] == metrics[0]["selection"]
        # The written fp32 model is the kept round's global model: its test accuracy is that round's.
        assert site_metrics["fp32"]["accuracy"] == pytest.approx(site_metrics["rounds"][kept - 1]["test_accuracy"])
        assert f"round {kept}: best validation loss" in (site_dir / "report.html").read_text()
    digests = {artifact["file"]: {m["artifacts"][index]["digest"] for m in metrics}
               for index, artifact in enumerate(metrics[0]["artifacts"])}
    assert digests and all(len(per_site) == 1 for per_site in digests.values())
    assert metrics[0]["n_train"] == 86 and metrics[0]["n_validation"] == 10  # 96 train samples, 10 %
