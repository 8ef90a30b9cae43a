"""quant/'s interface: federated calibration, QAT state, results, the torch.ao boundary."""

import copy
import importlib
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import quant
from tests.e2e_helpers import assert_identical, int8_tensors
from tests.test_quant_models import BnResidualNet, BranchingNet, LeNet, image_batches


_AO_ENTRY_POINTS = {
    "torch.ao.quantization": ["convert", "prepare", "prepare_qat", "fuse_modules", "fuse_modules_qat",
                              "disable_observer", "disable_fake_quant", "get_default_qconfig", "get_default_qat_qconfig",
                              "get_default_qconfig_mapping", "get_default_qat_qconfig_mapping",
                              "QuantStub", "DeQuantStub"],
    "torch.ao.quantization.quantize_fx": ["prepare_fx", "prepare_qat_fx", "convert_fx"],
    "torch.ao.quantization.fx.tracer": ["QuantizationTracer"],
    "torch.ao.quantization.observer": ["ObserverBase", "HistogramObserver"],
    "torch.ao.quantization.fake_quantize": ["FakeQuantizeBase"],
    "torch.ao.nn.intrinsic.qat": ["freeze_bn_stats"],
}


@pytest.mark.parametrize("module_name", sorted(_AO_ENTRY_POINTS))
def test_the_torch_ao_entry_points_quant_uses_still_exist(module_name):
    # fails the day torch removes the deprecated API (then: move quant/ to torchao's pt2e)
    module = importlib.import_module(module_name)
    for name in _AO_ENTRY_POINTS[module_name]:
        assert callable(getattr(module, name, None)), f"{module_name}.{name} is gone"


def test_no_deprecation_warning_escapes():
    batches = image_batches((1, 28, 28))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for prepare in (quant.prepare_ptq, quant.prepare_qat):
            prepared = prepare(LeNet().eval(), (batches[0],), "fbgemm")
            quant.calibrate(prepared, batches, 2)
            quant.forward_quant(quant.convert(prepared), batches[0])
    noisy = [str(w.message)[:80] for w in caught if "deprecat" in str(w.message).lower()]
    assert noisy == []


def test_set_engine_validates_the_backend():
    for backend in quant.FX_BACKENDS:
        quant.set_engine(backend)
        assert torch.backends.quantized.engine == backend
    with pytest.raises(quant.QuantizationError, match="'arm'.*fbgemm"):
        quant.set_engine("arm")


def test_prepare_wants_a_tuple_of_example_inputs():
    with pytest.raises(quant.QuantizationError, match="example_inputs must be a tuple"):
        quant.prepare_ptq(LeNet(), torch.rand(1, 1, 28, 28), "x86")


def test_forward_quant_moves_inputs_to_the_models_dtype():
    model = LeNet().double().eval()
    batch = torch.rand(2, 1, 28, 28)
    assert quant.forward_quant(model, batch).dtype == torch.float64
    assert torch.equal(quant.forward_quant(model, (batch,)), model(batch.double()))


def test_calibrate_takes_inputs_of_pairs_and_stops_after_num_batches():
    prepared = quant.prepare_ptq(LeNet().eval(), (torch.rand(2, 1, 28, 28),), "x86")
    small = [(torch.rand(4, 1, 28, 28), torch.zeros(4)) for _ in range(3)]
    huge = (torch.rand(4, 1, 28, 28) * 100, torch.zeros(4))
    quant.calibrate(prepared, small + [huge], num_batches=3)
    input_max = [v for k, v in quant.observer_stats(prepared).items() if k.endswith("max_val")]
    assert max(float(v.max()) for v in input_max[:1]) <= 1.0  # the fourth (huge) batch was not seen
    with pytest.raises(quant.QuantizationError, match="no batch"):
        quant.calibrate(prepared, [], 5)


# --- federated calibration -----------------------------------------------------------


def _with_minmax_observers(prepared):
    """Swap the histogram activation observers for MinMax ones (same dtype and range)."""
    from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver

    replacements = {}
    for path, module in list(prepared.named_modules(remove_duplicate=False)):
        if isinstance(module, HistogramObserver):
            if id(module) not in replacements:
                replacements[id(module)] = MinMaxObserver(
                    dtype=module.dtype, qscheme=module.qscheme,
                    quant_min=module.quant_min, quant_max=module.quant_max,
                )
            parent_path, _, name = path.rpartition(".")
            setattr(prepared.get_submodule(parent_path), name, replacements[id(module)])
    assert replacements, "no histogram observer to replace"
    return prepared


def _site_batches(site):
    # each site sees a differently scaled and shifted distribution
    return [batch * (1 + site) - 0.3 * site for batch in image_batches((1, 28, 28), count=3, batch=8, seed=site)]


def _calibrated_at_sites(prepared, sites=3):
    stats = []
    for site in range(sites):
        local = copy.deepcopy(prepared)
        quant.calibrate(local, _site_batches(site), 3)
        stats.append(quant.observer_stats(local))
    return stats


def _calibrated_on_union(prepared, sites=3):
    central = copy.deepcopy(prepared)
    union = [batch for site in range(sites) for batch in _site_batches(site)]
    quant.calibrate(central, union, len(union))
    return central


def _loaded(prepared, stats):
    local = copy.deepcopy(prepared)
    quant.load_observer_stats(local, stats)
    return local


def _activation_qparams(int8_model):
    return {k: torch.as_tensor(v) for k, v in int8_tensors(int8_model).items()
            if k.endswith(("scale", "zero_point", "scale_0", "zero_point_0")) and "weight" not in k
            and ".packed." not in k}


@pytest.mark.parametrize("backend", quant.FX_BACKENDS)
def test_federated_minmax_calibration_equals_calibrating_on_the_union(backend):
    torch.manual_seed(0)
    prepared = _with_minmax_observers(quant.prepare_ptq(BnResidualNet().eval(), (torch.rand(2, 1, 28, 28),), backend))
    merged = quant.merge_observer_stats(_calibrated_at_sites(prepared))
    central = _calibrated_on_union(prepared)

    assert_identical(merged, quant.observer_stats(central))
    assert_identical(int8_tensors(quant.convert(_loaded(prepared, merged))), int8_tensors(quant.convert(central)))


@pytest.mark.parametrize("backend", quant.FX_BACKENDS)
def test_federated_histogram_calibration_is_close_to_calibrating_on_the_union(backend):
    torch.manual_seed(0)
    prepared = quant.prepare_ptq(BnResidualNet().eval(), (torch.rand(2, 1, 28, 28),), backend)
    site_stats = _calibrated_at_sites(prepared)
    merged = quant.merge_observer_stats(site_stats)
    assert any(key.endswith(".histogram") for key in merged)
    federated = _activation_qparams(quant.convert(_loaded(prepared, merged)))
    central = _activation_qparams(quant.convert(_calibrated_on_union(prepared)))

    assert federated.keys() == central.keys() and federated
    for key in federated:
        if key.endswith("scale") or key.endswith("scale_0"):
            assert float((federated[key] / central[key] - 1).abs().max()) < 0.02, key
        else:  # zero point: within 2% of the int8 range
            assert int((federated[key] - central[key]).abs().max()) <= 5, key

    # two sites loading the same merged statistics build bit-identical int8 models
    assert_identical(
        int8_tensors(quant.convert(_loaded(prepared, merged))),
        int8_tensors(quant.convert(_loaded(prepared, merged))),
    )
    # and merging is deterministic
    assert_identical(merged, quant.merge_observer_stats(site_stats))


def test_histogram_merge_keeps_the_mass_and_range():
    prepared = quant.prepare_ptq(LeNet().eval(), (torch.rand(2, 1, 28, 28),), "x86")
    site_stats = _calibrated_at_sites(prepared)
    merged = quant.merge_observer_stats(site_stats)
    for key in (k for k in merged if k.endswith(".histogram")):
        path = key[: -len(".histogram")]
        total = sum(float(stats[key].double().sum()) for stats in site_stats)
        assert float(merged[key].double().sum()) == pytest.approx(total, rel=1e-5)
        assert float(merged[path + ".min_val"]) == min(float(s[path + ".min_val"]) for s in site_stats)
        assert float(merged[path + ".max_val"]) == max(float(s[path + ".max_val"]) for s in site_stats)
    one_site = quant.merge_observer_stats(site_stats[:1])
    for key in one_site:
        assert torch.allclose(one_site[key], site_stats[0][key], rtol=1e-5, atol=1e-3), key


def test_observer_stats_are_safetensors_ready():
    prepared = quant.prepare_ptq(LeNet().eval(), (torch.rand(2, 1, 28, 28),), "x86")
    quant.calibrate(prepared, image_batches((1, 28, 28)), 2)
    stats = quant.observer_stats(prepared)
    assert stats and all(isinstance(k, str) for k in stats)
    assert all(v.dtype in (torch.float32, torch.int64) and v.is_contiguous() and not v.is_quantized
               for v in stats.values())


def test_merge_refuses_different_key_sets():
    prepared = quant.prepare_ptq(LeNet().eval(), (torch.rand(2, 1, 28, 28),), "x86")
    stats = quant.observer_stats(prepared)
    fewer = dict(list(stats.items())[1:])
    with pytest.raises(quant.QuantizationError, match="site 1 has different observer keys"):
        quant.merge_observer_stats([stats, fewer])
    with pytest.raises(quant.QuantizationError, match="missing"):
        quant.load_observer_stats(prepared, fewer)


# --- QAT across sites -------------------------------------------------------------------


def _qat_trained(model, seed, steps=3):
    torch.manual_seed(seed)
    prepared = quant.prepare_qat(model, (torch.rand(2, 1, 28, 28),), "x86")
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.01)
    for _ in range(steps):
        batch = torch.rand(8, 1, 28, 28)
        loss = quant.forward_quant(prepared, batch).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return prepared


def _is_internal(key):
    return any(part in key for part in ("post_process", "fake_quant", "scale", "zero_point", "min_val",
                                         "max_val", "histogram", "observer_enabled", "eps"))


@pytest.mark.parametrize("model_class", [BnResidualNet, BranchingNet], ids=["fx", "eager"])
def test_qat_float_state_and_observer_stats_round_trip(model_class):
    torch.manual_seed(0)
    model = model_class()
    assert quant.float_state(model).keys() == model.state_dict().keys()

    site_a, site_b = _qat_trained(model, seed=1), _qat_trained(model, seed=2)
    state_a = quant.float_state(site_a)
    assert state_a and not [key for key in state_a if _is_internal(key)]
    assert any(key.endswith("num_batches_tracked") for key in state_a)  # BatchNorm buffers travel
    assert all(v.is_floating_point() for k, v in state_a.items() if not k.endswith("num_batches_tracked"))

    # FedAvg of two sites, then each site loads the average and the merged ranges
    average = {k: (state_a[k] + quant.float_state(site_b)[k]) / 2 if state_a[k].is_floating_point() else state_a[k]
               for k in state_a}
    merged = quant.merge_observer_stats([quant.observer_stats(site_a), quant.observer_stats(site_b)])
    for site in (site_a, site_b):
        quant.load_float_state(site, average)
        quant.load_observer_stats(site, merged)
        assert_identical(quant.float_state(site), average)
        assert_identical(quant.observer_stats(site), merged)
        for module in site.modules():  # fake quantization uses the loaded ranges
            if hasattr(module, "fake_quant_enabled"):
                assert torch.equal(module.scale, module.calculate_qparams()[0].to(module.scale.dtype))
        quant.freeze_qat(site)
    assert_identical(int8_tensors(quant.convert(site_a)), int8_tensors(quant.convert(site_b)))


def test_freeze_qat_disables_observers_and_freezes_batchnorm():
    prepared = quant.prepare_qat(BnResidualNet(), (torch.rand(2, 1, 28, 28),), "fbgemm")
    quant.forward_quant(prepared, torch.rand(4, 1, 28, 28))  # QAT training, in short
    fake_quants = [m for m in prepared.modules() if hasattr(m, "observer_enabled")]
    assert fake_quants and all(int(m.observer_enabled[0]) == 1 for m in fake_quants)
    quant.freeze_qat(prepared)
    assert all(int(m.observer_enabled[0]) == 0 for m in fake_quants)
    assert all(int(m.fake_quant_enabled[0]) == 1 for m in fake_quants)
    conv_bns = [m for m in prepared.modules() if hasattr(m, "freeze_bn")]
    assert conv_bns and all(m.freeze_bn for m in conv_bns)
    frozen = quant.observer_stats(prepared)
    quant.forward_quant(prepared, torch.rand(4, 1, 28, 28) * 50)
    assert_identical(quant.observer_stats(prepared), frozen)


def test_load_float_state_names_missing_and_unexpected_keys():
    prepared = quant.prepare_qat(LeNet(), (torch.rand(2, 1, 28, 28),), "x86")
    state = quant.float_state(prepared)
    state["extra.weight"] = state.pop("fc3.weight")
    with pytest.raises(quant.QuantizationError, match=r"missing: \['fc3.weight'\].*unexpected: \['extra.weight'\]"):
        quant.load_float_state(prepared, state)


# --- results ---------------------------------------------------------------------------

_RUN_SAVED = """
import sys, torch
torch.backends.quantized.engine = sys.argv[1]
for model_path, input_path, output_path in zip(*[iter(sys.argv[2:])] * 3):
    torch.save(torch.jit.load(model_path)(torch.load(input_path)), output_path)
"""


def test_saved_torchscript_runs_without_the_model_class(tmp_path):
    batches = image_batches((1, 28, 28))
    arguments = []
    expected = {}
    for name, model_class in (("fx", LeNet), ("eager", BranchingNet)):
        prepared = quant.prepare_ptq(model_class().eval(), (batches[0],), "x86")
        quant.calibrate(prepared, batches, 4)
        int8_model = quant.convert(prepared)
        quant.save_torchscript(int8_model, (batches[0],), tmp_path / f"{name}.pt", "x86")
        torch.save(batches[1], tmp_path / f"{name}_in.pt")
        arguments += [str(tmp_path / f"{name}.pt"), str(tmp_path / f"{name}_in.pt"), str(tmp_path / f"{name}_out.pt")]
        expected[name] = quant.forward_quant(int8_model, batches[1])
    # a fresh interpreter in an empty directory: the test module and its classes are unknown there
    subprocess.run([sys.executable, "-c", _RUN_SAVED, "x86", *arguments], cwd=tmp_path, check=True, timeout=120)
    for name, output in expected.items():
        assert torch.equal(torch.load(tmp_path / f"{name}_out.pt"), output), name
    # the eager model was scripted, not traced: its data-dependent branch survives
    assert "if" in torch.jit.load(str(tmp_path / "eager.pt")).model.code


def test_int8_state_dict_is_about_four_times_smaller():
    model = LeNet().eval()
    prepared = quant.prepare_ptq(model, (torch.rand(2, 1, 28, 28),), "x86")
    quant.calibrate(prepared, image_batches((1, 28, 28)), 2)
    ratio = quant.state_dict_size_bytes(quant.convert(prepared)) / quant.state_dict_size_bytes(model)
    assert 0.2 < ratio < 0.4


def test_latency_ms_runs_on_one_thread_and_restores_the_thread_count():
    threads = torch.get_num_threads()
    seen = []

    class ThreadProbe(nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x

    latency = quant.latency_ms(ThreadProbe(), torch.rand(2, 3), repeats=5, warmup=2)
    assert latency > 0
    assert seen == [1] * 7
    assert torch.get_num_threads() == threads
