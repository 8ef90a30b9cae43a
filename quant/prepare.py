"""Inserting observers (post-training) or fake quantization (QAT) into a copy of a model.

x86 / fbgemm / qnnpack: FX graph mode first: it fuses conv/bn/relu and linear/relu by
itself, quantizes functional ops and residual adds, and leaves ops without int8 kernels in
float. Eager mode only when torch.fx cannot trace the model.
xnnpack: torch.export + torchao's PT2E with ExecuTorch's XNNPACKQuantizer (pt2e.py).
"""

import copy

import torch
from torch import nn

from . import _ao, pt2e
from .eager import prepare_eager
from .engine import PT2E_BACKENDS, QuantInfo, attach_info, set_engine
from .run import observe_only_in_training
from .errors import QuantizationError
from .float_model import float_names_by_storage, prepared_to_float_names


def _check_example_inputs(example_inputs, operation: str) -> tuple:
    if not isinstance(example_inputs, tuple) or not all(isinstance(x, torch.Tensor) for x in example_inputs):
        raise QuantizationError(
            f"{operation}: example_inputs must be a tuple of tensors, e.g. (batch,), "
            f"got {type(example_inputs).__name__}"
        )
    return tuple(x.detach().cpu().clone() for x in example_inputs)


def _fx_trace_failure(model: nn.Module):
    """Why torch.fx cannot trace `model` (as prepare_fx traces it), or None if it can."""
    try:
        _ao.QuantizationTracer([], []).trace(model)
    except Exception as error:  # noqa: BLE001 - any tracing failure means: use eager mode
        return error
    return None


def _to_example_device(model: nn.Module, example_inputs: tuple) -> tuple:
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    return tuple(x.to(device) for x in example_inputs)


def _prepare(model: nn.Module, example_inputs, backend, qat: bool) -> nn.Module:
    operation = "prepare_qat" if qat else "prepare_ptq"
    set_engine(backend)
    cpu_examples = _check_example_inputs(example_inputs, operation)
    model = copy.deepcopy(model)
    model.train(qat)
    names_by_storage = float_names_by_storage(model)  # preparation keeps these tensor objects
    if backend in PT2E_BACKENDS:
        prepared = pt2e.prepare(model, cpu_examples, backend, qat,
                                lambda prepared: prepared_to_float_names(prepared, names_by_storage))
        if qat:
            observe_only_in_training(prepared)
        return prepared
    trace_failure = _fx_trace_failure(model)
    if trace_failure is None:
        mode = "fx"
        examples = _to_example_device(model, cpu_examples)
        try:
            if qat:
                prepared = _ao.prepare_qat_fx(model, _ao.get_default_qat_qconfig_mapping(backend), examples)
            else:
                prepared = _ao.prepare_fx(model, _ao.get_default_qconfig_mapping(backend), examples)
        except Exception as error:
            raise QuantizationError(
                f"{operation}: FX graph mode could not prepare {type(model).__name__}: {error}"
            ) from error
    else:
        mode = "eager"
        prepared = prepare_eager(model, cpu_examples, backend, qat)
    prepared.train(qat)
    if qat:
        observe_only_in_training(prepared)
    float_names = prepared_to_float_names(prepared, names_by_storage)
    attach_info(prepared, QuantInfo(mode=mode, backend=backend, example_inputs=cpu_examples,
                                    float_names=float_names, qat=qat))
    return prepared


def prepare_ptq(model: nn.Module, example_inputs: tuple, backend) -> nn.Module:
    """A copy of `model` in eval mode with observers (backend's default qconfig)."""
    return _prepare(model, example_inputs, backend, qat=False)


def prepare_qat(model: nn.Module, example_inputs: tuple, backend) -> nn.Module:
    """A copy of `model` in train mode with fake quantization (backend's default QAT qconfig)."""
    return _prepare(model, example_inputs, backend, qat=True)
