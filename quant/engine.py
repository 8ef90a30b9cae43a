"""Backends, and what a prepared model remembers about how it was prepared."""

import dataclasses

import torch
import torch.fx
from torch import nn

from .errors import QuantizationError

FX_BACKENDS = ("fbgemm", "qnnpack", "x86")  # torch.ao FX (eager as fallback), TorchScript files
PT2E_BACKENDS = ("xnnpack",)  # torchao PT2E, ExecuTorch / ONNX / torch.export files
BACKENDS = FX_BACKENDS + PT2E_BACKENDS
QUANT_TYPES = ("post_static", "qat")

_INFO_KEY = "quant_info"  # key in GraphModule.meta (deep copies keep meta, not attributes)


def set_engine(backend) -> None:
    """Select the int8 kernels that packing and running quantized layers use.

    PT2E backends (xnnpack) need no engine: their int8 models are reference graphs in PyTorch
    and run on their own kernels in ExecuTorch / ONNX Runtime.
    """
    if backend not in BACKENDS:
        raise QuantizationError(f"unknown quantization backend {backend!r}; expected one of {BACKENDS}")
    if backend in PT2E_BACKENDS:
        return
    if backend not in torch.backends.quantized.supported_engines:
        raise QuantizationError(
            f"quantization backend {backend!r} is not built into this torch "
            f"(supported: {torch.backends.quantized.supported_engines})"
        )
    torch.backends.quantized.engine = backend


@dataclasses.dataclass
class QuantInfo:
    mode: str  # "fx", "eager" or "pt2e"
    backend: str
    example_inputs: tuple  # CPU copies, to test-run the converted model
    # prepared state key -> the user's model's state keys it came from (see float_model.py)
    float_names: dict = dataclasses.field(default_factory=dict)
    qat: bool = False
    # pt2e only: BatchNorm uses its running statistics even in training mode (freeze_qat)
    batchnorm_frozen: bool = False


def attach_info(model: nn.Module, info: QuantInfo) -> None:
    if isinstance(model, torch.fx.GraphModule):
        model.meta[_INFO_KEY] = info
    else:
        # plain attribute: eager wrappers survive deepcopy with their __dict__
        model.__dict__["_quant_info"] = info


def info_of(model: nn.Module) -> QuantInfo:
    if isinstance(model, torch.fx.GraphModule):
        info = model.meta.get(_INFO_KEY)
    else:
        info = model.__dict__.get("_quant_info")
    if info is None:
        raise QuantizationError(
            f"{type(model).__name__} was not prepared by quant.prepare_ptq / quant.prepare_qat"
        )
    return info


def mode_of(prepared: nn.Module) -> str:
    """"fx", "eager" or "pt2e": how prepare_ptq / prepare_qat instrumented the model."""
    return info_of(prepared).mode
