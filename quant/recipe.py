"""One model's way to int8 across a run, as named steps (like torchvision's quantization recipe).

post_static: train in float -> calibrate (prepare_ptq + observers) -> convert with merged stats.
qat:         at the first QAT round prepare_qat -> train (rounds) -> freeze as scheduled -> convert;
             the float model written is the QAT model's trained weights in the user's class.
"""
from dataclasses import dataclass

from torch import nn

from .convert import convert
from .engine import mode_of, set_engine
from .float_model import to_float_model
from .prepare import prepare_ptq, prepare_qat
from .run import calibrate, freeze_qat
from .stats import load_observer_stats, merge_observer_stats, observer_stats


@dataclass
class Int8Recipe:
    quant_type: str          # "post_static" or "qat"
    backend: str
    example_inputs: tuple
    qat_schedule: tuple = (1, 1, 1)  # (first QAT round, BatchNorm freeze round, observer freeze round)
    float_layers: tuple = ()  # names of layers left in float (float_output_layer)
    prepared: nn.Module = None       # with observers (PTQ) or fake quantization (QAT)
    int8_model: nn.Module = None
    float_model: nn.Module = None    # set with the int8 model: the final float model

    @property
    def is_qat(self):
        return self.quant_type == "qat"

    def model_for_round(self, round_number, model):
        """The model to train in `round_number`: `model` itself, or from the first QAT round on
        its fake-quantized version (prepared once), frozen as the schedule says."""
        if not self.is_qat:
            return model
        first, freeze_bn, freeze_observers = self.qat_schedule
        if round_number == first:
            self.prepared = prepare_qat(model, self.example_inputs, self.backend, self.float_layers)
        if round_number < first:
            return model
        freeze_qat(self.prepared, observers=round_number >= freeze_observers,
                   batchnorm=round_number >= freeze_bn)
        return self.prepared

    def observer_stats(self):
        """The statistics that travel with the weights: QAT's ranges once QAT has started."""
        return observer_stats(self.prepared) if self.prepared is not None else {}

    def load_observer_stats(self, stats):
        if stats:
            load_observer_stats(self.prepared, stats)

    def calibrate(self, model, batches, num_batches):
        """post_static: observe `model` on this site's batches; the statistics of its data
        (weight observers' stay here: every site holds the same weights, so they are the same
        everywhere and carry nothing to merge). QAT: the ranges are merged already (none)."""
        if self.is_qat:
            return {}
        self.prepared = prepare_ptq(model, self.example_inputs, self.backend, self.float_layers)
        calibrate(self.prepared, batches, num_batches)
        return observer_stats(self.prepared, include_weights=False)

    def convert(self, merged_stats, model):
        """The int8 model from the federation's statistics; `model`: the user's float model."""
        if not self.is_qat:
            load_observer_stats(self.prepared, merged_stats, include_weights=False)
        set_engine(self.backend)
        self.int8_model = convert(self.prepared)
        self.float_model = to_float_model(self.prepared, model) if self.is_qat else model
        return self.int8_model

    @property
    def mode(self):
        return mode_of(self.prepared)


def merge_calibration(stats_per_site):
    """The federation's statistics from every site's (empty for QAT: nothing to merge)."""
    return merge_observer_stats(stats_per_site) if stats_per_site[0] else {}
