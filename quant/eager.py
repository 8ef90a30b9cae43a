"""Eager-mode quantization: the fallback for models torch.fx cannot trace.

Eager mode needs the quant/dequant stubs inside forward, fused modules found by name,
and every op between the stubs must have an int8 kernel. We wrap the user's model,
fuse what we can prove safe, and test-run the int8 result so that a model which cannot
run quantized fails at prepare time with the module and operation named.
"""

import copy

import torch
from torch import nn

from . import _ao
from .errors import QuantizationError
from .run import forward_quant, run_or_explain

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Longest first, so conv-bn-relu wins over conv-bn.
_FUSION_PATTERNS = (
    (_CONVS, _BATCHNORMS, (nn.ReLU,)),
    (_CONVS, _BATCHNORMS),
    (_CONVS, (nn.ReLU,)),
    ((nn.Linear,), (nn.ReLU,)),
)


class EagerQuantWrapper(nn.Module):
    """Quantizes the input on the way in and dequantizes the output on the way out.

    One tensor in, one tensor out, no *args: TorchScript can then script it, which
    keeps the user's data-dependent control flow in the saved file.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.quant = _ao.QuantStub()
        self.model = model
        self.dequant = _ao.DeQuantStub()

    def forward(self, x):
        return self.dequant(self.model(self.quant(x)))


def _matches(modules, pattern) -> bool:
    return len(modules) == len(pattern) and all(
        type(module) in kinds for module, kinds in zip(modules, pattern)
    )


def _fusion_options(model: nn.Module):
    """For each run of consecutive children (definition order) that fits a pattern: the
    module-path groups it could fuse to, longest first."""
    for parent_path, parent in model.named_modules():
        prefix = f"{parent_path}." if parent_path else ""
        children = list(parent.named_children())
        for index in range(len(children)):
            options = []
            for pattern in _FUSION_PATTERNS:
                run = children[index : index + len(pattern)]
                if _matches([module for _, module in run], pattern):
                    options.append([prefix + name for name, _ in run])
            if options:
                yield options


def _same_output(reference, output) -> bool:
    if isinstance(reference, (tuple, list)):
        return all(_same_output(r, o) for r, o in zip(reference, output))
    tolerance = 1e-4 * max(1.0, float(reference.abs().max()))
    return reference.shape == output.shape and torch.allclose(reference, output, rtol=1e-4, atol=tolerance)


def safe_fusions(model: nn.Module, example_inputs: tuple):
    """The fusions that leave the eval-mode output unchanged.

    Definition order is only a guess at execution order (and a ReLU module may be
    shared), so a fusion is kept only if the fused model still computes the same thing;
    if conv-bn-relu changes the output, conv-bn is tried instead.
    """
    fused = copy.deepcopy(model).eval()
    accepted, taken = [], set()
    with torch.no_grad():
        reference = forward_quant(fused, example_inputs)
        for options in list(_fusion_options(fused)):
            for group in options:
                if taken.intersection(group):
                    continue
                trial = _ao.fuse_modules(fused, [group])
                if _same_output(reference, forward_quant(trial, example_inputs)):
                    fused = trial
                    accepted.append(group)
                    taken.update(group)
                    break
    return accepted


def _check_runs_quantized(prepared: EagerQuantWrapper, example_inputs: tuple, operation: str) -> None:
    trial = copy.deepcopy(prepared).cpu().eval()
    run_or_explain(trial, example_inputs, f"{operation} (eager mode, observing)")
    int8_model = _ao.eager_convert(trial)
    run_or_explain(int8_model, example_inputs, f"{operation} (eager mode, int8 run)")


def prepare_eager(model: nn.Module, example_inputs: tuple, backend: str, qat: bool) -> nn.Module:
    """Wrap, fuse, attach observers (or fake quantization) and test the int8 run."""
    operation = "prepare_qat" if qat else "prepare_ptq"
    if len(example_inputs) != 1:
        raise QuantizationError(
            f"{operation}: torch.fx cannot trace {type(model).__name__}, and the eager-mode "
            f"fallback takes models with one input tensor (got {len(example_inputs)})"
        )
    wrapper = EagerQuantWrapper(model)
    fusions = [[f"model.{name}" for name in group] for group in safe_fusions(model, example_inputs)]
    if qat:
        wrapper.train()
        # in place: the wrapper holds the caller's copy, and quant.to_float_model maps the
        # trained tensors back by identity
        if fusions:
            wrapper = _ao.fuse_modules_qat(wrapper, fusions, inplace=True)
        wrapper.qconfig = _ao.get_default_qat_qconfig(backend)
        prepared = _ao.eager_prepare_qat(wrapper, inplace=True)
    else:
        wrapper.eval()
        if fusions:
            wrapper = _ao.fuse_modules(wrapper, fusions)
        wrapper.qconfig = _ao.get_default_qconfig(backend)
        prepared = _ao.eager_prepare(wrapper)
    if not isinstance(prepared, EagerQuantWrapper):
        raise QuantizationError(f"{operation}: eager preparation replaced the wrapper module")
    _check_runs_quantized(prepared, example_inputs, operation)
    return prepared
