"""The wire format: safetensors bytes whose `__metadata__` holds one JSON document.

safetensors stores raw little-endian tensor data behind a JSON header; reading it executes
nothing, unlike pickle (which the FeatureCloud engine uses by default). Every payload that
arrives is decoded here and only here.
"""
import json
import re
import struct

from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from federation.checks import PeerMessageError

_META_KEY = "meta"
# Bounds on the JSON another site sends, checked before parsing: a deep document would
# otherwise raise RecursionError, a huge one take the memory.
META_MAX_BYTES = 2**20
META_MAX_DEPTH = 32
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKETS = re.compile(r"[\[\]{}]")


class PayloadError(PeerMessageError):
    """A payload from another site could not be decoded; names the sending site."""

    problem = "bad payload"


def encode(tensors, meta):
    """Serialize a dict of tensors and a JSON-able dict into bytes."""
    plain = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    return save_tensors(plain, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})


def decode(data, sender):
    """Return (tensors, meta) from bytes received from `sender`; PayloadError if malformed."""
    if not isinstance(data, (bytes, bytearray)):
        raise PayloadError(f"payload from site {sender} is {type(data).__name__}, not bytes", sender)
    data = bytes(data)
    try:
        meta = _bounded_json(_header(data)["__metadata__"][_META_KEY])
        tensors = load_tensors(data)
    except (SafetensorError, ValueError, KeyError, TypeError, struct.error) as error:
        raise PayloadError(f"payload from site {sender} is not a valid message "
                           f"(safetensors + JSON metadata expected): {error}", sender) from None
    if not isinstance(meta, dict):
        raise PayloadError(f"payload from site {sender} has metadata that is not a JSON object", sender)
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


def _bounded_json(text):
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > META_MAX_BYTES:
        raise ValueError(f"metadata is {size} bytes; at most {META_MAX_BYTES} are accepted")
    depth = json_depth(text)
    if depth > META_MAX_DEPTH:
        raise ValueError(f"metadata is nested {depth} levels deep; at most {META_MAX_DEPTH} are accepted")
    return json.loads(text)


def json_depth(text):
    """The deepest nesting of arrays/objects in a JSON text (strings do not count)."""
    depth = deepest = 0
    for bracket in _JSON_BRACKETS.findall(_JSON_STRING.sub("", text)):
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest
