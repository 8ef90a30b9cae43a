"""From a prepared (calibrated or QAT-trained) model to an int8 model."""

import copy

import torch
from torch import nn

from . import _ao
from .engine import attach_info, info_of, set_engine
from .errors import QuantizationError
from .run import run_or_explain

# Layers that exist in every int8 model (stubs, containers) and so prove nothing.
_NOT_EVIDENCE = {"Quantize", "DeQuantize"}


def _is_quantized_layer(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__module__.startswith(_ao.QUANTIZED_MODULE_PREFIXES) and cls.__name__ not in _NOT_EVIDENCE


def _float_layers(model: nn.Module):
    return sorted(
        {type(m).__name__ for m in model.modules() if not list(m.children()) and list(m.parameters())}
    )


def convert(prepared: nn.Module) -> nn.Module:
    """The int8 model (eval mode, CPU), test-run once on the example input."""
    info = info_of(prepared)
    set_engine(info.backend)  # weights are packed for the engine selected now
    model = copy.deepcopy(prepared).cpu().eval()
    try:
        int8_model = _ao.convert_fx(model) if info.mode == "fx" else _ao.eager_convert(model)
    except Exception as error:
        raise QuantizationError(f"convert ({info.mode} mode): {type(error).__name__}: {error}") from error
    int8_model.eval()
    attach_info(int8_model, info)
    if not any(_is_quantized_layer(m) for m in int8_model.modules()):
        raise QuantizationError(
            f"convert: nothing in {type(prepared).__name__} was quantized; "
            f"layers left in float: {', '.join(_float_layers(int8_model)) or 'none'}"
        )
    run_or_explain(int8_model, info.example_inputs, f"convert ({info.mode} mode, int8 run)")
    return int8_model
