"""Weighted federated averaging (buffers included) and the checks on received updates."""
import pytest
import torch
from torch import nn

from federation.aggregate import weighted_average
from federation.checks import SiteMismatchError, UpdateError, check_report, check_tensors, schema_of


def bn_net(value):
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    with torch.no_grad():
        for tensor in net.state_dict().values():
            tensor.fill_(value)
    return net.state_dict()


def test_weighted_by_samples_including_batchnorm_buffers():
    a, b = bn_net(1.0), bn_net(4.0)
    averaged = weighted_average([a, b], [300, 100])
    for name, tensor in averaged.items():
        if tensor.is_floating_point():
            assert torch.allclose(tensor, torch.full_like(tensor, 1.75)), name
    # BatchNorm's running statistics are averaged too, not only the parameters.
    assert torch.allclose(averaged["1.running_mean"], torch.full((2,), 1.75))
    assert torch.allclose(averaged["1.running_var"], torch.full((2,), 1.75))


def test_integer_buffers_are_not_averaged_as_floats():
    a, b = bn_net(0.0), bn_net(0.0)
    a["1.num_batches_tracked"] = torch.tensor(7)
    b["1.num_batches_tracked"] = torch.tensor(3)
    averaged = weighted_average([a, b], [1, 1])
    assert averaged["1.num_batches_tracked"].dtype == torch.int64
    assert averaged["1.num_batches_tracked"].item() == 7


def test_average_keeps_dtypes_and_is_exact_for_equal_models():
    a = bn_net(0.3)
    averaged = weighted_average([a, a, a], [5, 6, 7])
    for name in a:
        assert averaged[name].dtype == a[name].dtype
        assert torch.equal(averaged[name], a[name])


@pytest.mark.parametrize("corrupt, text", [
    (lambda s: s.pop("0.weight"), "missing"),
    (lambda s: s.update(extra=torch.zeros(1)), "unexpected"),
    (lambda s: s.update({"0.weight": torch.zeros(3, 1, 3, 3)}), "expected torch.float32[2, 1, 3, 3]"),
    (lambda s: s.update({"0.weight": torch.zeros(2, 1, 3, 3, dtype=torch.float64)}), "torch.float64"),
    (lambda s: s["0.bias"].fill_(float("nan")), "NaN or infinite"),
])
def test_bad_update_names_the_sender(corrupt, text):
    reference, update = bn_net(1.0), bn_net(1.0)
    corrupt(update)
    with pytest.raises(UpdateError, match="site abc123") as error:
        check_tensors(schema_of(reference), update, "abc123")
    assert text in str(error.value)


@pytest.mark.parametrize("kind, meta, text", [
    ("update", {"n_train": 0, "train_loss": 0.1, "train_accuracy": 0.9}, "'n_train' is 0"),
    ("update", {"n_train": True, "train_loss": 0.1, "train_accuracy": 0.9}, "'n_train' is True"),
    ("update", {"n_train": 10, "train_loss": "0.1", "train_accuracy": 0.9}, "'train_loss' is '0.1'"),
    ("test", {"n_test": 5, "test_loss": 0.2}, "'test_accuracy' is None"),
    ("summary", {"n_train": 5, "n_test": 5, "input_shape": "1x28x28", "n_classes": 10}, "'input_shape'"),
])
def test_malformed_reports_name_the_sender(kind, meta, text):
    with pytest.raises(SiteMismatchError, match="site s2") as error:
        check_report(kind, meta, "s2")
    assert text in str(error.value)


def test_well_formed_report_passes():
    check_report("update", {"n_train": 10, "train_loss": 0.5, "train_accuracy": 1}, "s1")


def test_observer_ranges_may_be_infinite_but_never_nan():
    reference = {"obs.min_val": torch.tensor([0.0]), "obs.max_val": torch.tensor([1.0])}
    unseen = {"obs.min_val": torch.tensor([float("inf")]), "obs.max_val": torch.tensor([float("-inf")])}
    check_tensors(schema_of(reference), unseen, "s1", allow_infinite=True)
    with pytest.raises(UpdateError, match="NaN or infinite"):
        check_tensors(schema_of(reference), unseen, "s1")
    with pytest.raises(UpdateError, match="site s1: 'obs.max_val' has NaN"):
        check_tensors(schema_of(reference), {**unseen, "obs.max_val": torch.tensor([float("nan")])}, "s1", allow_infinite=True)


def test_results_report_figures_are_checked():
    good = {"n_train": 5, "n_test": 5, "fp32": {"accuracy": 0.9, "loss": 0.1}, "int8": {"accuracy": 0.9, "loss": 0.1},
            "artifacts": [{"file": "model_int8.pte", "accuracy": 0.9, "size_bytes": 70000,
                           "sha256": "0" * 64, "digest": "0" * 64}]}
    check_report("results", good, "s3")
    with pytest.raises(SiteMismatchError, match="site s3 sent a 'results' report whose 'int8.accuracy' is 'high'"):
        check_report("results", {**good, "int8": {"accuracy": "high", "loss": 0.1}}, "s3")
    with pytest.raises(SiteMismatchError, match="'artifacts\\[0\\].sha256' is 'x'"):
        check_report("results", {**good, "artifacts": [{**good["artifacts"][0], "sha256": "x"}]}, "s3")
