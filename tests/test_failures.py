"""Failures through the real app and the testbed: a clear error at the right site, nobody hangs."""
import os
import pickle
import time

import pytest
import torch

import testbed
from tests.e2e_helpers import QUICK, SAMPLE_CLIENTS, make_client, make_generic

MARKER = "/tmp/fc-quant-exploit-marker"


class Exploit:
    """What a malicious peer or relay could send: unpickling it creates a file."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def run(tmp_path, clients, overrides=None, extra_files=None, **options):
    generic = make_generic(tmp_path / "generic", {**QUICK, **(overrides or {})}, extra_files)
    return testbed.run_federation(clients, generic, tmp_path / "out", quiet=True, timeout=180, **options)


def test_bad_config_at_one_site_fails_fast_and_names_it(tmp_path):
    clients = [make_client(tmp_path / "c1", SAMPLE_CLIENTS[0]),
               make_client(tmp_path / "c2", SAMPLE_CLIENTS[1], {"config.yml": "fc_quantization: [broken\n"}),
               make_client(tmp_path / "c3", SAMPLE_CLIENTS[2])]
    started = time.monotonic()
    result = run(tmp_path, clients)
    assert not result.ok and result.failed_site == 2
    assert result.last_status[1]["state"] == "error"
    assert "config.yml" in result.last_status[1]["message"]
    assert "not valid YAML" in result.log_paths[1].read_text()
    assert time.monotonic() - started < 60


def test_input_shapes_that_differ_between_sites_are_named_by_the_coordinator(tmp_path):
    inputs, labels = torch.load(SAMPLE_CLIENTS[2] / "train_dataset.pth", weights_only=True)
    small = inputs[:, :, :14, :14].contiguous()
    import io
    buffers = {}
    for name, tensors in (("train_dataset.pth", (small, labels)), ("test_dataset.pth", (small[:50], labels[:50]))):
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        buffers[name] = buffer.getvalue()
    clients = [make_client(tmp_path / "c1", SAMPLE_CLIENTS[0]), make_client(tmp_path / "c2", SAMPLE_CLIENTS[1]),
               make_client(tmp_path / "c3", SAMPLE_CLIENTS[2], buffers)]
    # The third site's model check fails first if its data does not fit the model, so let the
    # model accept any size: the coordinator's cross-site check is what is tested here.
    model = ("import torch\nclass Model(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
             "        self.pool = torch.nn.AdaptiveAvgPool2d(4)\n        self.fc = torch.nn.Linear(16, 10)\n"
             "    def forward(self, x):\n        return self.fc(torch.flatten(self.pool(x), 1))\n")
    result = run(tmp_path, clients, extra_files={"mnist_model.py": model})
    assert not result.ok and result.failed_site == 1
    log = result.log_paths[0].read_text()
    assert "inputs have shape (1, 14, 14)" in log and "(the coordinator's) have (1, 28, 28)" in log


def test_pickle_from_the_network_is_never_unpickled(tmp_path):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    exploit = pickle.dumps(Exploit())

    def replace_update(sender, receiver, memo, payload):
        return exploit if (sender, memo) == (2, "update_1") else payload

    result = run(tmp_path, SAMPLE_CLIENTS, relay_filter=replace_update)
    assert not os.path.exists(MARKER), "a pickle from the network was executed"
    assert not result.ok and result.failed_site == 1  # the coordinator received it
    assert result.last_status[0]["state"] == "error"
    log = result.log_paths[0].read_text()
    assert "is not a valid message (safetensors + JSON metadata expected)" in log


@pytest.mark.parametrize("poisoned, failing", [((3, 1, "update_1"), 1), ((1, 2, "global_1"), 2)],
                         ids=["update from a participant", "global model from the coordinator"])
def test_a_bad_model_is_rejected_naming_the_sender(tmp_path, poisoned, failing):
    from federation import payload

    def poison(sender, receiver, memo, data):
        if (sender, receiver, memo) != poisoned:
            return data
        tensors, meta = payload.decode(data, "test")
        tensors["w/fc1.weight"] = torch.full_like(tensors["w/fc1.weight"], float("nan"))
        return payload.encode(tensors, meta)

    result = run(tmp_path, SAMPLE_CLIENTS, relay_filter=poison)
    assert not result.ok and result.failed_site == failing
    log = result.log_paths[failing - 1].read_text()
    assert "'w/fc1.weight' has NaN or infinite values" in log and "update from site" in log


KILLER = """
import os, signal
from training import train as default_train

def train(model, train_loader, epochs, learning_rate):
    if os.path.exists(os.path.join(os.environ["FC_INPUT_DIR"], "die.txt")):
        os.kill(os.getpid(), signal.SIGKILL)
    return default_train(model, train_loader, epochs, learning_rate)
"""


def test_a_killed_site_stops_the_run_and_is_named(tmp_path):
    clients = [make_client(tmp_path / "c1", SAMPLE_CLIENTS[0]),
               make_client(tmp_path / "c2", SAMPLE_CLIENTS[1], {"die.txt": "x"}),
               make_client(tmp_path / "c3", SAMPLE_CLIENTS[2])]
    started = time.monotonic()
    result = run(tmp_path, clients, {"train_function": "killer.py"}, {"killer.py": KILLER})
    assert not result.ok and result.failed_site == 2
    assert result.message.startswith("client_2") and "process exited with code -9" in result.message
    assert time.monotonic() - started < 60
    assert len(result.site_outputs) == 3
