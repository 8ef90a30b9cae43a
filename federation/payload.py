"""The wire format: safetensors bytes whose `__metadata__` holds one JSON document.

safetensors stores raw little-endian tensor data behind a JSON header; reading it executes
nothing, unlike pickle (which the FeatureCloud engine uses by default). Every payload that
arrives is decoded here and only here.
"""
import json
import struct

from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

_META_KEY = "meta"


class PayloadError(ValueError):
    """A payload from another site could not be decoded; names the sending site."""


def encode(tensors, meta):
    """Serialize a dict of tensors and a JSON-able dict into bytes."""
    plain = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    return save_tensors(plain, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})


def decode(data, sender):
    """Return (tensors, meta) from bytes received from `sender`; PayloadError if malformed."""
    if not isinstance(data, (bytes, bytearray)):
        raise PayloadError(f"payload from site {sender} is {type(data).__name__}, not bytes")
    data = bytes(data)
    try:
        meta = json.loads(_header(data)["__metadata__"][_META_KEY])
        tensors = load_tensors(data)
    except (SafetensorError, ValueError, KeyError, TypeError, struct.error) as error:
        raise PayloadError(f"payload from site {sender} is not a valid message "
                           f"(safetensors + JSON metadata expected): {error}") from None
    if not isinstance(meta, dict):
        raise PayloadError(f"payload from site {sender} has metadata that is not a JSON object")
    return tensors, meta


def _header(data):
    # safetensors layout: 8-byte little-endian header length, then the JSON header.
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise ValueError(f"header length {length} exceeds the payload size {len(data)}")
    header = json.loads(data[8:8 + length])
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header
