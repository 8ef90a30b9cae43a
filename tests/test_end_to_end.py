"""The whole app on the bundled sample: 3 sites through the testbed, every site's outputs checked."""
import csv

import pytest

import testbed
from tests.e2e_helpers import (SAMPLE, SAMPLE_CLIENTS, assert_every_site_holds_the_same_models,
                               assert_saved_models_reproduce_the_metrics, read_metrics)

OUTPUT_FILES = ["config.yml", "model_fp32.pt", "model_int8.pt", "metrics.json", "metrics.csv",
                "report.html", "y_test.csv", "y_pred.csv"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    result = testbed.run_federation(SAMPLE_CLIENTS, SAMPLE / "generic", out, quiet=True, timeout=600)
    assert result.ok, result.message
    return result


def test_every_site_writes_all_outputs(run):
    for site_dir in run.site_outputs:
        for name in OUTPUT_FILES:
            assert (site_dir / name).is_file(), f"{site_dir.name} lacks {name}"


def test_metrics_json_and_csv(run):
    for index, site_dir in enumerate(run.site_outputs, start=1):
        metrics = read_metrics(site_dir)
        assert metrics["backend"] == "x86" and metrics["quant_type"] == "post_static"
        assert metrics["site"]["coordinator"] == (index == 1)
        # 10 % of each site's training data is its validation split (validation_fraction's default)
        assert metrics["n_train"] + metrics["n_validation"] + metrics["n_test"] in (1666, 1667)
        assert metrics["n_validation"] == 133
        # logit_adjustment: auto, resolved at every site alike (the report's "Logit adjustment" row)
        assert metrics["config"]["logit_adjustment"] == 0.5
        assert metrics["logit_adjustment"]["strength"] == 0.5 and metrics["logit_adjustment"]["requested"] == "auto"
        assert [row["round"] for row in metrics["rounds"]] == [1, 2, 3, 4, 5]
        for row in metrics["rounds"]:
            assert 0 <= row["test_accuracy"] <= 1 and row["train_loss"] > 0
        for precision in ("fp32", "int8"):
            figures = metrics[precision]
            assert 0 < figures["accuracy"] <= 1 and figures["loss"] > 0
            assert figures["size_bytes"] > 0 and figures["latency_ms"] > 0
        assert metrics["int8"]["size_bytes"] * 3 < metrics["fp32"]["size_bytes"]
        with open(site_dir / "metrics.csv") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == 5 and float(rows[-1]["test_accuracy"]) == pytest.approx(metrics["rounds"][-1]["test_accuracy"])


def test_federation_figures_meet_the_targets_and_agree_across_sites(run):
    federations = [read_metrics(site_dir)["federation"] for site_dir in run.site_outputs]
    assert federations[0] == federations[1] == federations[2]
    federation = federations[0]
    assert federation["n_sites"] == 3 and federation["n_train"] == 3601 and federation["n_test"] == 1000
    assert len(federation["rounds"]) == 5
    assert federation["fp32"]["accuracy"] >= 0.93
    assert federation["int8"]["accuracy"] >= federation["fp32"]["accuracy"] - 0.01
    # Federation-wide = test-sample-weighted mean of the sites' figures.
    sites = [read_metrics(site_dir) for site_dir in run.site_outputs]
    weighted = sum(m["int8"]["accuracy"] * m["n_test"] for m in sites) / sum(m["n_test"] for m in sites)
    assert federation["int8"]["accuracy"] == pytest.approx(weighted)


def test_every_site_holds_the_same_models(run):
    assert_every_site_holds_the_same_models(run.site_outputs)


def test_every_site_writes_the_same_int8_bytes(run):
    """TorchScript is written byte-deterministically: one SHA-256 says every site holds the
    same model (metrics.json's, checked by the coordinator, and the file's own)."""
    import quant

    digests = {quant.sha256_of(site_dir / "model_int8.pt") for site_dir in run.site_outputs}
    assert len(digests) == 1
    for site_dir in run.site_outputs:
        (artifact,) = read_metrics(site_dir)["artifacts"]
        assert artifact["file"] == "model_int8.pt" and {artifact["sha256"]} == digests
        assert artifact["accuracy"] == pytest.approx(read_metrics(site_dir)["int8"]["accuracy"], abs=1e-6)


def test_saved_models_reproduce_the_reported_accuracy(run):
    assert_saved_models_reproduce_the_metrics(SAMPLE_CLIENTS, run.site_outputs, "x86")
