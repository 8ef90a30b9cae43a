"""federation.compress: int8 per-channel deltas (error bound, ~4x bytes, identical globals)."""
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from bench.simulate import run_rounds
from federation import payload
from federation.checks import UpdateError
from federation.compress import INT8, SCALE, compress, decompress, dequantize_per_channel, quantize_per_channel
from federation.site import Site
import testbed
from testbed.split import write_client_dirs
from tests.e2e_helpers import SAMPLE_CLIENTS, load_user_model, make_generic, read_metrics

ROOT = Path(__file__).resolve().parent.parent
MNIST_MODEL = ROOT / "data" / "sample" / "generic" / "mnist_model.py"
TINY_CONFIG = {"batch_size": 16, "learning_rate": 0.002, "epochs": 1, "max_iter": 2, "seed": 3}


def tiny_federation(out_dir, n_sites=3, per_site=48, extra_files=(), **config):
    """Sites on random 1x28x28 digits (LeNet trains on them in milliseconds); `extra_files`
    go to generic/ beside config.yml (e.g. a train_function file)."""
    generator = torch.Generator().manual_seed(0)
    splits = [(torch.rand(per_site, 1, 28, 28, generator=generator),
               torch.randint(0, 10, (per_site,), generator=generator),
               torch.rand(16, 1, 28, 28, generator=generator),
               torch.randint(0, 10, (16,), generator=generator)) for _ in range(n_sites)]
    write_client_dirs(splits, out_dir, MNIST_MODEL, {**TINY_CONFIG, **config}, extra_files)
    generic = Path(out_dir) / "generic"
    sites = []
    for index in range(1, n_sites + 1):
        client = Path(out_dir) / f"client_{index}"
        for file in generic.iterdir():
            (client / file.name).write_bytes(file.read_bytes())
        sites.append(Site.load(client))
    return sites


def receive_own_model(site):
    """Load the site's own model as if it were the global one (a one-site federation's start)."""
    site.receive_global("self", site.codec.encode_model(site.local_message()))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 20), st.floats(1e-6, 1e3), st.integers(0, 2**16))
def test_error_per_channel_is_at_most_half_a_step(channels, width, magnitude, seed):
    generator = torch.Generator().manual_seed(seed)
    # channels of very different magnitude: a per-tensor scale would fail the small ones
    tensor = torch.randn(channels, width, generator=generator) * magnitude \
        * torch.logspace(-3, 0, channels)[:, None]
    values, scale = quantize_per_channel(tensor)
    assert values.dtype == torch.int8 and scale.shape == (channels,)
    error = (dequantize_per_channel(values, scale) - tensor).abs()
    assert (error <= scale[:, None] / 2 * (1 + 1e-5) + 1e-12).all()


def test_all_zero_channel_round_trips_exactly():
    tensor = torch.zeros(2, 3, 3)
    tensor[1] = 0.5
    values, scale = quantize_per_channel(tensor)
    assert torch.equal(dequantize_per_channel(values, scale), tensor)


def test_compress_sends_only_int8_deltas_for_matrices():
    reference = {"w/conv.weight": torch.randn(4, 2, 3, 3), "w/conv.bias": torch.randn(4),
                 "w/bn.num_batches_tracked": torch.tensor(3)}
    tensors = {name: value + 0.01 if value.is_floating_point() else value + 1
               for name, value in reference.items()}
    message = compress(tensors, reference)
    assert message[INT8 + "w/conv.weight"].dtype == torch.int8
    assert message[SCALE + "w/conv.weight"].shape == (4,)
    assert torch.equal(message["w/conv.bias"], tensors["w/conv.bias"])
    assert torch.equal(message["w/bn.num_batches_tracked"], tensors["w/bn.num_batches_tracked"])
    restored = decompress(message, reference, sender=2)
    assert set(restored) == set(tensors)
    assert torch.allclose(restored["w/conv.weight"], tensors["w/conv.weight"], atol=1e-6)


def test_float_message_passes_unchanged():
    tensors = {"w/a": torch.randn(3, 3)}
    assert decompress(tensors, None, sender=1)["w/a"] is tensors["w/a"]


@pytest.mark.parametrize("damage, expected", [
    (lambda m: m.update({INT8 + "w/a": torch.zeros(2, 3, dtype=torch.int8)}), "expected int8"),
    (lambda m: m.pop(SCALE + "w/a"), "needs finite float scales"),
    (lambda m: m.update({SCALE + "w/a": torch.full((3,), float("nan"))}), "needs finite float scales"),
    (lambda m: m.update({INT8 + "w/b": torch.zeros(3, 3, dtype=torch.int8)}), "no such tensor"),
])
def test_malformed_int8_update_names_site_and_tensor(damage, expected):
    reference = {"w/a": torch.randn(3, 3)}
    message = compress({"w/a": torch.randn(3, 3)}, reference)
    damage(message)
    with pytest.raises(UpdateError, match=rf"site 7: 'w/[ab]' .*{expected}"):
        decompress(message, reference, sender=7)


@pytest.fixture(scope="module")
def federations(tmp_path_factory):
    """The same tiny federation run with float and with int8 communication (fedadam, so the
    server optimizer's output is what travels)."""
    runs = {}
    for communication in ("float32", "int8"):
        sites = tiny_federation(tmp_path_factory.mktemp(communication), communication=communication,
                                aggregation="fedadam")
        runs[communication] = (sites, run_rounds(sites))
    return runs


def test_int8_globals_are_bit_identical_at_every_site(federations):
    sites, _ = federations["int8"]
    for site in sites[1:]:
        for name, tensor in sites[0].codec.last_global.items():
            assert torch.equal(site.codec.last_global[name], tensor), name
        for (name, mine), theirs in zip(sites[0].local.model.state_dict().items(),
                                        site.local.model.state_dict().values()):
            assert torch.equal(mine, theirs), name


def test_int8_messages_are_about_four_times_smaller(federations):
    _, float_run = federations["float32"]
    _, int8_run = federations["int8"]
    for kind in ("update_bytes", "global_bytes"):  # means over equally many messages
        ratio = float_run[kind] / int8_run[kind]
        assert 3.5 < ratio < 4.1, (kind, ratio)


def test_int8_training_stays_close_to_float(federations):
    float_global = federations["float32"][0][0].codec.last_global
    int8_global = federations["int8"][0][0].codec.last_global
    for name, tensor in float_global.items():
        if tensor.is_floating_point():
            gap = (int8_global[name] - tensor).abs().max().item()
            assert gap < 0.05 * max(tensor.abs().max().item(), 1e-3) + 0.02, name


def test_app_with_int8_communication_end_to_end(tmp_path):
    """The real states through the testbed: int8 updates both ways, fedavgm at the coordinator;
    every site ends with the same model, and metrics.json shows ~4x fewer update bytes."""
    generic = tmp_path / "generic"
    make_generic(generic, {"communication": "int8", "aggregation": "fedavgm", "epochs": 1, "max_iter": 2})
    result = testbed.run_federation(SAMPLE_CLIENTS, generic, tmp_path / "out", quiet=True, timeout=600)
    assert result.ok, result.message
    model = load_user_model(generic / "mnist_model.py")
    float_update = len(payload.encode({"w/" + k: v for k, v in model.state_dict().items()}, {}))
    models = [torch.load(site_dir / "model_fp32.pt", weights_only=True) for site_dir in result.site_outputs]
    for site_dir, model in zip(result.site_outputs, models):
        assert all(torch.equal(models[0][name], model[name]) for name in model)
        sent = read_metrics(site_dir)["bytes_sent"]["by_memo"]
        for memo in ("update_1", "update_2"):
            assert 3.5 < float_update / sent[memo] < 4.1, (site_dir, memo, sent[memo])
    assert read_metrics(result.site_outputs[0])["fp32"]["accuracy"] > 0.8
