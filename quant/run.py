"""Running float, prepared and int8 models; calibration; QAT freezing."""

import contextlib
import itertools
import linecache
import re
import traceback

import torch
from torch import nn

from . import _ao, _pt2e, pt2e
from .errors import QuantizationError

_ATEN_OP = re.compile(r"'(aten::[\w.]+|quantized::[\w.]+)'")
_NO_INT8_KERNEL_HINT = (
    "this operation has no int8 kernel. In eager mode every op between the quant and "
    "dequant stubs runs on int8 tensors: use torch.ao.nn.quantized.FloatFunctional for "
    "tensor +/*/cat, replace functional ops by modules, or make the model traceable by "
    "torch.fx (no data-dependent control flow) so that such ops stay in float."
)


def _model_device_and_dtype(model: nn.Module):
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32  # int8 models hold no float tensors


def _to_model(tensor, device, dtype):
    if not isinstance(tensor, torch.Tensor):
        return tensor
    if tensor.is_floating_point():
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device=device)


def forward_quant(model: nn.Module, data) -> torch.Tensor:
    """Forward pass of a float, QAT-prepared or int8 model (FX or eager).

    `data` is one input tensor or a tuple/list of input tensors; it is moved to the
    model's device and floating dtype (int8 models run on the CPU in float32).
    """
    device, dtype = _model_device_and_dtype(model)
    with _ao.quiet(), _pt2e.quiet():
        if isinstance(data, (tuple, list)):
            return model(*(_to_model(item, device, dtype) for item in data))
        return model(_to_model(data, device, dtype))


def _inputs_of(batch):
    """A batch is an input tensor or an (inputs, labels) pair."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def calibrate(prepared: nn.Module, batches, num_batches: int) -> None:
    """Feed at most `num_batches` batches through the observers (no gradients)."""
    if num_batches < 1:
        raise QuantizationError(f"calibrate: num_batches must be at least 1, got {num_batches}")
    seen = 0
    with torch.no_grad():
        for batch in batches:
            if seen >= num_batches:
                break
            forward_quant(prepared, _inputs_of(batch))
            seen += 1
    if seen == 0:
        raise QuantizationError("calibrate: the calibration data yielded no batch")


def freeze_qat(prepared: nn.Module, observers: bool = True, batchnorm: bool = True) -> None:
    """PyTorch's late-QAT recipe: fix the quantization ranges and/or BatchNorm statistics.

    pt2e (xnnpack): observers as in FX; BatchNorm switches to its inference form (running
    statistics, not updated) also in training mode, see quant/pt2e.py."""
    if isinstance(prepared, pt2e.Pt2eGraphModule):
        pt2e.freeze(prepared, observers=observers, batchnorm=batchnorm)
        return
    if observers:
        prepared.apply(_ao.disable_observer)
    if batchnorm:
        prepared.apply(_ao.freeze_bn_stats)


def _pause_observer_in_eval(fake_quant: nn.Module, _inputs) -> None:
    if not fake_quant.training and bool(fake_quant.observer_enabled[0]):
        fake_quant.observer_enabled[0] = 0
        fake_quant.__dict__["_observer_paused"] = True


def _resume_observer(fake_quant: nn.Module, _inputs, _output) -> None:
    if fake_quant.__dict__.pop("_observer_paused", False):
        fake_quant.observer_enabled[0] = 1


def observe_only_in_training(prepared_qat: nn.Module) -> None:
    """Evaluating a QAT model (eval mode) must not move its quantization ranges: ranges fitted
    to test data would leak it into the int8 model, and each site's test set would pull its
    ranges apart from the federation's. Training mode observes as the schedule says."""
    fake_quant_classes = (_ao.FakeQuantizeBase, *_pt2e.fake_quant_classes())
    for module in prepared_qat.modules():
        if isinstance(module, fake_quant_classes):
            module.register_forward_pre_hook(_pause_observer_in_eval)
            module.register_forward_hook(_resume_observer, always_call=True)


@contextlib.contextmanager
def _module_stack(model: nn.Module):
    """Track which modules are executing, to name the one a failure happened in."""
    stack, handles = [], []

    def enter(path):
        def hook(_module, _inputs):
            stack.append(path)  # returns None: a pre-hook's return value would replace the input

        return hook

    def leave(_module, _inputs, _output):
        stack.pop()  # returns None: a hook's return value would replace the output

    for path, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(path)))
        handles.append(module.register_forward_hook(leave))
    try:
        yield stack
    finally:
        for handle in handles:
            handle.remove()


def _generated_code_line(error: BaseException):
    """The line of torch.fx generated code (if any) that raised `error`."""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if frame.filename.startswith("<eval_with_key"):
            line = linecache.getline(frame.filename, frame.lineno).strip()
            return line or None
    return None


def describe_failure(model: nn.Module, error: BaseException, failing_path) -> str:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    op = _ATEN_OP.search(str(error))
    parts = [f"operation {op.group(1)}" if op else f"{type(error).__name__}: {message}"]
    if failing_path is not None:
        module = model.get_submodule(failing_path)
        parts.append(f"in module '{failing_path or '<top level>'}' ({type(module).__name__})")
    code_line = _generated_code_line(error)
    if code_line:
        parts.append(f"at `{code_line}`")
    text = " ".join(parts)
    if "QuantizedCPU" in str(error):
        text += f": {_NO_INT8_KERNEL_HINT}"
    elif op:
        text += f": {message}"
    return text


def run_or_explain(model: nn.Module, inputs: tuple, operation: str) -> torch.Tensor:
    """Run `model(*inputs)`; turn a failure into a QuantizationError naming module and op."""
    with _module_stack(model) as stack, torch.no_grad():
        try:
            return forward_quant(model, inputs)
        except Exception as error:  # noqa: BLE001 - any failure here is a quantization failure
            failing_path = stack[-1] if stack else None
            raise QuantizationError(
                f"{operation}: {describe_failure(model, error, failing_path)}"
            ) from error
