"""The wire, in one place: every message a site sends or receives is encoded and decoded here.

Model messages (`update_<r>` from a site, `global_<r>` from the coordinator) carry up to three
kinds of tensors: weights (parameters and buffers, averaged), quantization observer
statistics (ranges, merged: averaging a range would shrink it below what some site saw) and
SCAFFOLD's control variates (averaged like the weights).

    encode: join (name prefixes) -> compress (int8 deltas, `communication: int8`) -> payload
    decode: payload -> decompress -> check against the expected schema -> split

Reports (summary, test figures, results, final) are metadata only, range-checked like every
model message's metadata (federation.checks.check_report); statistics messages
(calibration, qparams) are observer statistics only. Nothing received is used unchecked.
"""
import re
from dataclasses import dataclass, field

from federation import payload
from federation.checks import check_report, check_tensors, schema_of
from federation.compress import compress, decompress

WEIGHTS, OBSERVERS, CONTROLS = "w/", "q/", "c/"


def memo_kind(memo):
    """'update_3' -> 'update', 'dp_sum_3_17' -> 'dp_sum': the message a memo names."""
    return re.sub(r"(_\d+)+$", "", memo)


def round_memo(memo):
    """'dp_sum_3_17' -> 'dp_sum_3': a round's step messages are accounted under the round."""
    return re.sub(r"(_\d+)_\d+$", r"\1", memo)


@dataclass
class ModelMessage:
    weights: dict
    observers: dict = field(default_factory=dict)
    controls: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def joined(self):
        """One flat dict of prefixed tensors, as it travels."""
        return {**{WEIGHTS + k: v for k, v in self.weights.items()},
                **{OBSERVERS + k: v for k, v in self.observers.items()},
                **{CONTROLS + k: v for k, v in self.controls.items()}}

    @classmethod
    def split(cls, tensors, meta=None):
        parts = [{name[len(prefix):]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}
                 for prefix in (WEIGHTS, OBSERVERS, CONTROLS)]
        return cls(*parts, meta=meta or {})


class Codec:
    """One site's encoder and decoder. It holds the two things decoding needs: the last global
    model (what int8 deltas refer to) and the schema every model message must have (the local
    model's, set with `expect` whenever the local model changes shape, e.g. when QAT starts)."""

    def __init__(self, communication="float32"):
        self.int8 = communication == "int8"
        self.last_global = None  # prefixed tensors of the last global model received
        self.model_schema = None

    def expect(self, local_message):
        self.model_schema = schema_of(local_message.joined())

    # -- model messages ---------------------------------------------------------------------
    def encode_model(self, message):
        tensors = message.joined()
        if self.int8 and self.last_global is not None:
            tensors = compress(tensors, self.last_global)
        return payload.encode(tensors, message.meta)

    def decode_model(self, sender, data, report=None):
        """A site's update or a global model; `report` ("update", "global"): the kind of report
        its metadata must be (federation.checks.REPORT_FIELDS)."""
        tensors, meta = payload.decode(data, sender)
        tensors = decompress(tensors, self.last_global, sender)
        check_tensors(self.model_schema, tensors, sender)
        if report:
            check_report(report, meta, sender)
        return ModelMessage.split(tensors, meta)

    def decode_global(self, sender, data):
        """The coordinator's global model; it is what the next int8 deltas refer to."""
        message = self.decode_model(sender, data, report="global")
        self.last_global = message.joined()
        return message

    # -- reports and statistics -------------------------------------------------------------
    @staticmethod
    def encode_report(meta):
        return payload.encode({}, meta)

    @staticmethod
    def decode_report(sender, data, kind=None):
        _, meta = payload.decode(data, sender)
        if kind:
            check_report(kind, meta, sender)
        return meta

    @staticmethod
    def encode_stats(stats):
        return payload.encode(stats, {})

    @staticmethod
    def decode_stats(sender, data, own_stats):
        """Observer statistics, checked against this site's own (same observers)."""
        stats, _ = payload.decode(data, sender)
        check_tensors(schema_of(own_stats), stats, sender, allow_infinite=True)
        return stats
