"""`seed` makes runs reproducible: equal metrics and bit-identical int8 models."""
import torch

import testbed
from tests.e2e_helpers import QUICK, SAMPLE_CLIENTS, assert_identical, int8_tensors, make_generic, read_metrics

TIMING_FREE = ("rounds", "n_train", "n_test", "backend", "quant_type", "quantization_mode")


def comparable(metrics):
    """Everything in metrics.json except what depends on the clock or the run's site ids."""
    kept = {key: metrics[key] for key in TIMING_FREE}
    for precision in ("fp32", "int8"):
        kept[precision] = {k: v for k, v in metrics[precision].items() if k != "latency_ms"}
    kept["federation"] = {**metrics["federation"],  # without the sites' ids
                          "sites": [{k: v for k, v in site.items() if k != "id"} for site in metrics["federation"]["sites"]]}
    return kept


def test_same_seed_same_results(tmp_path):
    generic = make_generic(tmp_path / "generic", {**QUICK, "seed": 7})
    runs = []
    for name in ("first", "second"):
        result = testbed.run_federation(SAMPLE_CLIENTS[:2], generic, tmp_path / name, quiet=True, timeout=180)
        assert result.ok, result.message
        runs.append(result.site_outputs)
    for first, second in zip(*runs):
        assert comparable(read_metrics(first)) == comparable(read_metrics(second))
        a = int8_tensors(torch.jit.load(first / "model_int8.pt"))
        b = int8_tensors(torch.jit.load(second / "model_int8.pt"))
        assert_identical(a, b)
