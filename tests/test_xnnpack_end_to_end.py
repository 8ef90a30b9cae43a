"""backend: xnnpack through the real app (3 sites, the testbed): every site writes the same
.pte, .onnx and .pt2 bytes, each measured in its own runtime, and the files reproduce the
figures metrics.json reports."""
import pytest
import torch

import quant
import testbed
from federation.checks import SiteMismatchError
from federation.coordinator import _check_same_files
from tests.e2e_helpers import QUICK, SAMPLE_CLIENTS, make_generic, read_metrics

FILES = ["model_int8.pte", "model_int8.onnx", "model_int8.pt2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    generic = make_generic(tmp_path_factory.mktemp("generic") / "generic", {**QUICK, "backend": "xnnpack"})
    result = testbed.run_federation(SAMPLE_CLIENTS, generic, tmp_path_factory.mktemp("out"), quiet=True,
                                    timeout=900)
    assert result.ok, result.message
    return result


def test_every_site_writes_the_same_three_files(run):
    digests = []
    for site_dir in run.site_outputs:
        assert not (site_dir / "model_int8.pt").exists()  # TorchScript is the FX backends' format
        digests.append([quant.sha256_of(site_dir / name) for name in FILES])
        metrics = read_metrics(site_dir)
        assert [artifact["file"] for artifact in metrics["artifacts"]] == FILES
        assert [artifact["sha256"] for artifact in metrics["artifacts"]] == digests[-1]
    assert digests[0] == digests[1] == digests[2]
    federation = read_metrics(run.site_outputs[0])["federation"]
    assert [artifact["sha256"] for artifact in federation["artifacts"]] == digests[0]


def test_each_file_reproduces_its_reported_figures_in_its_own_runtime(run):
    for client_dir, site_dir in zip(SAMPLE_CLIENTS, run.site_outputs):
        metrics = read_metrics(site_dir)
        inputs, labels = torch.load(client_dir / "test_dataset.pth", weights_only=True)
        for artifact in metrics["artifacts"]:
            path = site_dir / artifact["file"]
            assert artifact["size_bytes"] == path.stat().st_size
            assert set(artifact["latency_ms"]) == {"1", str(metrics["config"]["batch_size"])}
            predictions = quant.load_artifact(path, backend="xnnpack")(inputs).argmax(dim=-1)
            accuracy = (predictions == labels).float().mean().item()
            assert accuracy == pytest.approx(artifact["accuracy"], abs=1e-6), artifact["file"]
            assert abs(accuracy - metrics["fp32"]["accuracy"]) < 0.02
        assert metrics["quantization_mode"] == "pt2e"


def test_the_report_shows_the_files_beside_fp32(run):
    page = (run.site_outputs[1] / "report.html").read_text()
    assert "<table id='artifacts'>" in page
    for name in ("model_fp32.pt (fp32)", *FILES, "ExecuTorch (XNNPACK)", "ONNX Runtime"):
        assert name in page


def test_a_site_whose_files_differ_is_named():
    own = [{"file": "model_int8.pte", "digest": "a" * 64}]
    _check_same_files(own, [{"file": "model_int8.pte", "digest": "a" * 64}], "s2")
    with pytest.raises(SiteMismatchError, match="site s3's model_int8.pte differs from the coordinator's"):
        _check_same_files(own, [{"file": "model_int8.pte", "digest": "b" * 64}], "s3")
    with pytest.raises(SiteMismatchError, match="site s4 wrote the int8 files"):
        _check_same_files(own, [{"file": "model_int8.onnx", "digest": "a" * 64}], "s4")
