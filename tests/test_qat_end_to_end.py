"""QAT through the whole app with a user's own training function: 3 sites via the testbed."""
import json

import pytest

import testbed
from tests.e2e_helpers import (REPO, SAMPLE_CLIENTS, assert_every_site_holds_the_same_models,
                               assert_saved_models_reproduce_the_metrics, make_generic, read_metrics)

CUSTOM_TRAIN = REPO / "tests" / "fixtures" / "custom_train" / "train.py"
ROUNDS = 3
OVERRIDES = {"quant_type": "qat", "train_function": "train.py", "max_iter": ROUNDS, "epochs": 1,
             "learning_rate": 0.05, "backend": "fbgemm", "qat_warmup_rounds": 1,
             # The switch to QAT mid-run must survive int8 deltas and a server optimizer.
             "communication": "int8", "aggregation": "fedavgm"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    generic = make_generic(tmp_path_factory.mktemp("qat") / "generic", OVERRIDES,
                           {"train.py": CUSTOM_TRAIN.read_text()})
    out = tmp_path_factory.mktemp("qat_e2e")
    result = testbed.run_federation(SAMPLE_CLIENTS, generic, out, quiet=True, timeout=300)
    assert result.ok, result.message
    return result


def test_every_site_finished_with_qat_on_the_configured_backend(run):
    assert len(run.site_outputs) == 3
    for site_dir in run.site_outputs:
        metrics = read_metrics(site_dir)
        assert metrics["quant_type"] == "qat" and metrics["backend"] == "fbgemm"
        assert metrics["config"]["train_function"] == "train.py"
        assert [row["round"] for row in metrics["rounds"]] == list(range(1, ROUNDS + 1))
        assert metrics["int8"]["accuracy"] >= 0.8  # learned something, through fake quantization


def test_the_custom_train_function_trained_every_round(run):
    for site_dir in run.site_outputs:
        calls = [json.loads(line) for line in (site_dir / "custom_train_calls.txt").read_text().splitlines()]
        assert len(calls) == ROUNDS
        assert all(call["epochs"] == 1 and call["learning_rate"] == 0.05 and call["batches"] > 0 for call in calls)
        # warm-up round in float, then the fake-quantized model (QAT)
        assert [call["fake_quantized"] for call in calls] == [False] + [True] * (ROUNDS - 1)


def test_every_site_holds_the_same_int8_and_float_models(run):
    assert_every_site_holds_the_same_models(run.site_outputs)


def test_saved_models_reproduce_the_reported_accuracy(run):
    # model_fp32.pt holds the QAT-trained float weights in the user's class.
    assert_saved_models_reproduce_the_metrics(SAMPLE_CLIENTS, run.site_outputs, "fbgemm")
