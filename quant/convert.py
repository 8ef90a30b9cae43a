"""From a prepared (calibrated or QAT-trained) model to an int8 model."""

import copy

import torch
from torch import nn

from . import _ao, _pt2e, pt2e
from .engine import attach_info, info_of, set_engine
from .errors import QuantizationError
from .run import run_or_explain

# An int8 model whose output on the example input is further than this (max abs
# difference over max abs output) from the prepared model's is broken, not imprecise:
# sound models stay under 0.1. Seen with qnnpack's hardtanh/ReLU6 on channels-last
# tensors (torch 2.14), which scrambles its output without raising.
_GROSS_DEVIATION = 0.5

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
    if info.mode == "pt2e":
        return _convert_pt2e(prepared, info)
    set_engine(info.backend)  # weights are packed for the engine selected now
    model = copy.deepcopy(prepared).cpu().eval()
    reference_model = copy.deepcopy(model)  # convert_fx rewrites the graph it is given
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
    int8_output = run_or_explain(int8_model, info.example_inputs, f"convert ({info.mode} mode, int8 run)")
    _check_close_to_prepared(reference_model, int8_output, info)
    return int8_model


def _convert_pt2e(prepared: nn.Module, info) -> nn.Module:
    """PT2E: the reference int8 graph (torch.int8 weights, quantize/dequantize ops)."""
    reference_model, int8_model = pt2e.convert(prepared)
    int8_output = run_or_explain(int8_model, info.example_inputs, "convert (pt2e mode, int8 run)")
    _check_close_to_prepared(reference_model, int8_output, info)
    return int8_model


def _max_relative_deviation(reference, output) -> float:
    if isinstance(reference, (tuple, list)):
        return max(_max_relative_deviation(r, o) for r, o in zip(reference, output))
    scale = float(reference.abs().max())
    return float((reference - output).abs().max()) / scale if scale > 0 else float((output != 0).any())


def _int8_clamp(module: nn.Module, inputs, _output):
    """Forward hook: fake-quantize with the module's scale and zero point over all 8 bits."""
    return torch.fake_quantize_per_tensor_affine(
        inputs[0], float(module.scale), int(module.zero_point), 0, 255)


def _with_int8_headroom(module: nn.Module) -> None:
    """Let a reduce_range activation fake quantization clamp where the int8 kernels do."""
    if (isinstance(module, _ao.FakeQuantizeBase) and module.dtype == torch.quint8
            and module.activation_post_process.quant_max == 127 and module.scale.numel() == 1
            and bool(module.fake_quant_enabled[0])):
        module.register_forward_hook(_int8_clamp)


def _check_close_to_prepared(prepared_copy: nn.Module, int8_output, info) -> None:
    """Refuse an int8 model that computes something else than the model it came from.

    The references are the prepared model as is and, for QAT, with the int8 kernels'
    headroom: with reduce_range the fake quantization clamps activations at 7 bits (0..127)
    where the int8 kernels clamp at 8 (0..255, same scale), so a QAT model whose activations
    saturate their ranges has an int8 model above its fake-quantized outputs. A broken
    kernel is far from both.
    """
    with torch.no_grad(), _ao.quiet(), _pt2e.quiet():
        deviation = _max_relative_deviation(prepared_copy(*info.example_inputs), int8_output)
        prepared_copy.apply(_with_int8_headroom)  # no effect on post-training observers
        deviation = min(deviation, _max_relative_deviation(prepared_copy(*info.example_inputs), int8_output))
    if deviation > _GROSS_DEVIATION:
        raise QuantizationError(
            f"convert: on the example input the int8 model's output differs from the float "
            f"model's by {deviation:.0%} of its range (backend {info.backend!r}, {info.mode} mode): "
            f"either the observers' ranges do not fit the data (calibrate on data like the "
            f"example input; after QAT: the fake-quantization ranges were fixed before the "
            f"model had settled, so its activations saturate them: train in float first with "
            f"qat_warmup_rounds) or an int8 kernel of this backend computes wrong results "
            f"(known: qnnpack's hardtanh/ReLU6 after a convolution; use backend 'x86' or 'fbgemm')"
        )
