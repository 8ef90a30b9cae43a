"""The wire format: safetensors + JSON, never pickle."""
import os
import pickle

import pytest
import torch

from federation.payload import PayloadError, decode, encode


def test_round_trip_tensors_and_meta():
    tensors = {"w": torch.randn(3, 4), "n": torch.tensor(5), "h": torch.arange(6, dtype=torch.float64)}
    decoded, meta = decode(encode(tensors, {"round": 2, "rows": [{"a": 0.5}]}), "site")
    assert meta == {"round": 2, "rows": [{"a": 0.5}]}
    assert decoded.keys() == tensors.keys()
    for name in tensors:
        assert torch.equal(decoded[name], tensors[name]) and decoded[name].dtype == tensors[name].dtype


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/payload-exploit-marker",))


@pytest.mark.parametrize("data", [pickle.dumps(Exploit()), pickle.dumps({"w": torch.zeros(2)}), b"", b"\x00" * 7,
                                  encode({}, {})[:-3] + b"zzz"])
def test_foreign_bytes_are_rejected_without_executing(data, tmp_path):
    marker = "/tmp/payload-exploit-marker"
    if os.path.exists(marker):
        os.remove(marker)
    with pytest.raises(PayloadError, match="site 0123abcd"):
        decode(data, "0123abcd")
    assert not os.path.exists(marker)
