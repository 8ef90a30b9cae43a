"""int8 communication (`communication: int8`): model updates travel as int8 deltas.

Every site holds the identical previous global model, so what changes in a round is sent as
`delta = tensor - previous global`, quantized symmetrically per output channel (dim 0) to
int8 with one float32 scale per channel: about 4x fewer bytes than float32. The receiver adds
the dequantized delta to its own copy of the previous global. Because every site (the
coordinator included) decodes the same broadcast bytes against the same previous global, all
globals stay bit-identical.

Sent as they are: tensors with fewer than two dimensions (biases, BatchNorm statistics:
a per-channel scale would be as large as the tensor), integer buffers, observer statistics,
and tensors the previous global lacks or has in another shape (the first QAT round).
"""
import torch

from federation.checks import UpdateError

INT8 = "int8/"    # name prefix of a quantized delta
SCALE = "scale/"  # name prefix of its per-channel scales
LEVELS = 127      # symmetric: -127..127, so that 0 is exact and the range is balanced


def quantize_per_channel(tensor):
    """(int8 values, float32 scale per dim-0 channel) with |dequantized - tensor| <= scale / 2."""
    flat = tensor.detach().float().reshape(len(tensor), -1)
    scale = flat.abs().amax(dim=1) / LEVELS
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero channel: any scale
    values = torch.round(flat / scale[:, None]).clamp(-LEVELS, LEVELS).to(torch.int8)
    return values.reshape(tensor.shape), scale


def dequantize_per_channel(values, scale):
    shape = (-1,) + (1,) * (values.dim() - 1)
    return values.float() * scale.reshape(shape)


def _compressible(name, tensor, reference):
    previous = reference.get(name)
    return (tensor.is_floating_point() and tensor.dim() >= 2 and previous is not None
            and previous.shape == tensor.shape and previous.dtype == tensor.dtype)


def compress(tensors, reference):
    """The message for `tensors` given the previous global `reference` (both prefixed dicts)."""
    message = {}
    for name, tensor in tensors.items():
        if _compressible(name, tensor, reference):
            delta = tensor.detach().cpu().float() - reference[name].cpu().float()
            message[INT8 + name], message[SCALE + name] = quantize_per_channel(delta)
        else:
            message[name] = tensor
    return message


def decompress(message, reference, sender):
    """Inverse of `compress` (a float message passes unchanged); UpdateError names `sender`
    when a quantized delta does not fit the previous global."""
    tensors = {}
    for name, tensor in message.items():
        if name.startswith(SCALE):
            continue
        if not name.startswith(INT8):
            tensors[name] = tensor
            continue
        target = name[len(INT8):]
        previous, scale = (reference or {}).get(target), message.get(SCALE + target)
        _check_delta(target, tensor, scale, previous, sender)
        delta = dequantize_per_channel(tensor, scale)
        tensors[target] = (previous.float() + delta).to(previous.dtype)
    return tensors


def _check_delta(name, values, scale, previous, sender):
    problem = None
    if previous is None:
        problem = "the previous global model has no such tensor"
    elif values.dtype != torch.int8 or values.shape != previous.shape:
        problem = f"is {values.dtype}{list(values.shape)}, expected int8{list(previous.shape)}"
    elif scale is None or scale.shape != (len(previous),) or not torch.isfinite(scale).all():
        problem = f"needs finite float scales '{SCALE + name}' of shape [{len(previous)}]"
    if problem:
        raise UpdateError(f"int8 update from site {sender}: '{name}' {problem}", sender, "bad int8 update")
