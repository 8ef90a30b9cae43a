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


_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def float_output_layer(model: nn.Module, example_inputs: tuple, backend: str) -> str:
    """The name of the Linear or Conv layer whose output is the model's output (a classifier's
    last layer), found by running the model once on the example inputs: the layer
    `float_layers` can keep in float. QuantizationError where the model or backend cannot."""
    outputs = []
    hooks = [module.register_forward_hook(lambda module, args, output, name=name: outputs.append((name, output)))
             for name, module in model.named_modules() if isinstance(module, _LAYER_TYPES)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            result = model(*_check_example_inputs(example_inputs, "float_output_layer"))
    except QuantizationError:
        raise
    except Exception as error:  # the user's forward
        raise QuantizationError(f"float_output_layer: {type(model).__name__} fails on one example input: "
                                f"{type(error).__name__}: {error}") from error
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    name = next((name for name, output in reversed(outputs) if output is result), None)
    if name is None:
        raise QuantizationError(
            f"float_output_layer: the output of {type(model).__name__} is not the output of a Linear or "
            "Conv layer (something is computed after the last one, e.g. a softmax or a reshape)")
    trace_failure = None if backend in PT2E_BACKENDS else _fx_trace_failure(model)
    if trace_failure is not None:
        raise QuantizationError(f"float_output_layer: with backend {backend} a layer can stay in float only in "
                                f"a model torch.fx can trace; it cannot trace {type(model).__name__}: {trace_failure}")
    return name


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


def _fx_qconfig_mapping(backend, qat: bool, float_layers: tuple):
    mapping = _ao.get_default_qat_qconfig_mapping(backend) if qat else _ao.get_default_qconfig_mapping(backend)
    for name in float_layers:
        mapping.set_module_name(name, None)
    return mapping


def _prepare(model: nn.Module, example_inputs, backend, qat: bool, float_layers: tuple) -> nn.Module:
    operation = "prepare_qat" if qat else "prepare_ptq"
    set_engine(backend)
    cpu_examples = _check_example_inputs(example_inputs, operation)
    model = copy.deepcopy(model)
    model.train(qat)
    names_by_storage = float_names_by_storage(model)  # preparation keeps these tensor objects
    if backend in PT2E_BACKENDS:
        prepared = pt2e.prepare(model, cpu_examples, backend, qat,
                                lambda prepared: prepared_to_float_names(prepared, names_by_storage), float_layers)
        if qat:
            observe_only_in_training(prepared)
        return prepared
    trace_failure = _fx_trace_failure(model)
    if trace_failure is None:
        mode = "fx"
        examples = _to_example_device(model, cpu_examples)
        mapping = _fx_qconfig_mapping(backend, qat, float_layers)
        try:
            prepared = (_ao.prepare_qat_fx if qat else _ao.prepare_fx)(model, mapping, examples)
        except Exception as error:
            raise QuantizationError(
                f"{operation}: FX graph mode could not prepare {type(model).__name__}: {error}"
            ) from error
    else:
        if float_layers:  # the eager wrapper quantizes from its input stub to its output stub
            raise QuantizationError(
                f"{operation}: float layers {list(float_layers)} need a model that torch.fx can trace "
                f"or backend xnnpack; torch.fx cannot trace {type(model).__name__}: {trace_failure}")
        mode = "eager"
        prepared = prepare_eager(model, cpu_examples, backend, qat)
    prepared.train(qat)
    if qat:
        observe_only_in_training(prepared)
    float_names = prepared_to_float_names(prepared, names_by_storage)
    attach_info(prepared, QuantInfo(mode=mode, backend=backend, example_inputs=cpu_examples,
                                    float_names=float_names, qat=qat))
    return prepared


def prepare_ptq(model: nn.Module, example_inputs: tuple, backend, float_layers: tuple = ()) -> nn.Module:
    """A copy of `model` in eval mode with observers (backend's default qconfig); the modules
    named in `float_layers` stay in float."""
    return _prepare(model, example_inputs, backend, qat=False, float_layers=tuple(float_layers))


def prepare_qat(model: nn.Module, example_inputs: tuple, backend, float_layers: tuple = ()) -> nn.Module:
    """A copy of `model` in train mode with fake quantization (backend's default QAT qconfig);
    the modules named in `float_layers` stay in float."""
    return _prepare(model, example_inputs, backend, qat=True, float_layers=tuple(float_layers))
