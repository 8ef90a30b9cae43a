"""From a QAT-prepared model back to the user's float model class.

Preparation fuses modules (FX puts conv+bn(+relu) into one QAT module named after the
conv; eager mode does the same under its wrapper), so the prepared model's state keys
differ from the user's. The prepared model holds the very tensor objects of the model
it was made from, so the mapping is read off tensor identity at preparation time: exact,
whatever the fusion did, with no name guessing.
"""

import copy
from collections import defaultdict

from torch import nn

from .engine import info_of
from .errors import QuantizationError
from .stats import float_state


def _storage_key(tensor):
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)


def float_names_by_storage(model: nn.Module) -> dict:
    """Before preparation: which state keys of `model` each tensor is (tied weights: several)."""
    names = defaultdict(list)
    for key, tensor in model.state_dict(keep_vars=True).items():
        if tensor.numel() > 0:
            names[_storage_key(tensor)].append(key)
    return names


def prepared_to_float_names(prepared: nn.Module, names_by_storage: dict) -> dict:
    """After preparation: prepared state key -> the user's state keys holding that tensor."""
    mapping = {}
    for key, tensor in float_state(prepared).items():
        float_keys = names_by_storage.get(_storage_key(tensor)) if tensor.numel() > 0 else None
        if float_keys:
            mapping[key] = tuple(float_keys)
    return mapping


def to_float_model(prepared_qat: nn.Module, float_model: nn.Module) -> nn.Module:
    """A copy of `float_model` (the user's class) holding the prepared model's trained
    weights and BatchNorm statistics, in the float model's train/eval mode."""
    mapping = info_of(prepared_qat).float_names
    prepared_state = prepared_qat.state_dict()
    state = {}
    for prepared_key, float_keys in mapping.items():
        for float_key in float_keys:
            state[float_key] = prepared_state[prepared_key].detach().clone()
    missing = sorted(set(float_model.state_dict()) - set(state))
    if missing:
        raise QuantizationError(
            f"to_float_model: the prepared model holds no trained value for {missing[:5]} of "
            f"{type(float_model).__name__} (post-training preparation folds BatchNorm into the "
            f"convolutions: only a QAT-prepared model maps back to the float model)"
        )
    result = copy.deepcopy(float_model)
    try:
        result.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise QuantizationError(f"to_float_model: {type(float_model).__name__}: {error}") from error
    return result
