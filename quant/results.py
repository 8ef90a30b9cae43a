"""What is reported about and saved of an int8 model."""

import io
import statistics
import time

import torch
from torch import nn

from . import _ao
from .engine import set_engine
from .errors import QuantizationError
from .run import forward_quant


def _compile(model: nn.Module, example_inputs: tuple):
    """TorchScript of the model: scripted (keeps control flow) or else traced."""
    try:
        return torch.jit.script(model)
    except Exception:  # noqa: BLE001 - not scriptable Python: tracing records one path
        return torch.jit.trace(model, example_inputs, check_trace=False)


def _same(expected, actual) -> bool:
    if isinstance(expected, (tuple, list)):
        return len(expected) == len(actual) and all(_same(e, a) for e, a in zip(expected, actual))
    return torch.equal(expected, actual)


def save_torchscript(int8_model: nn.Module, example_inputs: tuple, path, backend) -> None:
    """Save a TorchScript file that runs without the user's model class.

    Run it with `torch.backends.quantized.engine = backend` then `torch.jit.load(path)`.
    """
    set_engine(backend)
    int8_model = int8_model.cpu().eval()
    with torch.no_grad(), _ao.quiet():
        try:
            scripted = _compile(int8_model, example_inputs)
        except Exception as error:
            raise QuantizationError(
                f"save_torchscript: {type(int8_model).__name__} cannot be scripted or traced: {error}"
            ) from error
        torch.jit.save(scripted, str(path))
        # A file that silently computes something else is worse than no file.
        expected = int8_model(*example_inputs)
        reloaded = torch.jit.load(str(path))(*example_inputs)
    if not _same(expected, reloaded):
        raise QuantizationError(f"save_torchscript: {path} does not reproduce the int8 model's output")


def state_dict_size_bytes(model: nn.Module) -> int:
    """Bytes of torch.save(model.state_dict()), measured in memory."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def latency_ms(model: nn.Module, batch, repeats: int = 20, warmup: int = 3) -> float:
    """Median single-thread forward time in milliseconds."""
    if repeats < 1:
        raise QuantizationError(f"latency_ms: repeats must be at least 1, got {repeats}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for _ in range(warmup):
                forward_quant(model, batch)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                forward_quant(model, batch)
                times.append((time.perf_counter() - start) * 1000.0)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)
