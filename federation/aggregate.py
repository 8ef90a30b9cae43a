"""Federated averaging of whole state_dicts, and the checks every received update passes."""
import torch

import quant


class UpdateError(ValueError):
    """A model update from another site does not fit the local model; names the sending site."""


def weighted_average(states, weights):
    """Average state_dicts weighted by `weights` (each site's number of training samples).

    Every floating-point entry is averaged (parameters and buffers alike, so BatchNorm running
    statistics are federated too), accumulated in float64 so the result does not depend on
    rounding of the partial sums more than necessary. Integer buffers (BatchNorm's
    num_batches_tracked) are counters, not quantities to average: the largest one is kept.
    """
    if not states or len(states) != len(weights):
        raise ValueError("need one weight per state_dict and at least one state_dict")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("the weights must add up to more than 0")
    averaged = {}
    for name, reference in states[0].items():
        values = [state[name] for state in states]
        if reference.is_floating_point():
            accumulated = sum(v.to(torch.float64) * (w / total) for v, w in zip(values, weights))
            averaged[name] = accumulated.to(reference.dtype)
        else:
            averaged[name] = torch.stack(values).amax(dim=0)
    return averaged


def check_update(reference, update, sender, allow_infinite=False):
    """Raise UpdateError unless `update` has the reference's keys, shapes and dtypes, all finite.

    `allow_infinite`: for observer statistics, where an observer that saw no data keeps its
    initial +-inf range; NaN is still refused.
    """
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        raise UpdateError(f"update from site {sender} does not match the model: "
                          f"missing {missing[:5]}, unexpected {extra[:5]}")
    for name, expected in reference.items():
        got = update[name]
        if got.shape != expected.shape or got.dtype != expected.dtype:
            raise UpdateError(f"update from site {sender}: '{name}' is {got.dtype}{list(got.shape)}, "
                              f"expected {expected.dtype}{list(expected.shape)}")
        if not got.is_floating_point():
            continue
        if torch.isnan(got).any() or not (allow_infinite or torch.isfinite(got).all()):
            raise UpdateError(f"update from site {sender}: '{name}' has NaN or infinite values")


# Updates carry up to three kinds of tensors, told apart by a prefix: weights (parameters
# and buffers, averaged), quantization observer statistics (ranges, merged: averaging a
# range would shrink it below what some site saw) and SCAFFOLD's control variates (one per
# trainable parameter, averaged like the weights).
WEIGHTS = "w/"
OBSERVERS = "q/"
CONTROLS = "c/"


def federated_average(updates, weights):
    """Combine prefixed updates: average the weights and control variates, merge the
    observer statistics."""
    parts = [split(update) for update in updates]
    averaged = weighted_average([weights_part for weights_part, _ in parts], weights)
    observer_stats = [stats for _, stats in parts]
    merged = quant.merge_observer_stats(observer_stats) if observer_stats[0] else {}
    controls = [control_variates(update) for update in updates]
    averaged_controls = weighted_average(controls, weights) if controls[0] else {}
    return join(averaged, merged, averaged_controls)


def _strip(tensors, prefix):
    return {name[len(prefix):]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}


def split(tensors):
    """(weights, observer statistics) of a prefixed update."""
    return _strip(tensors, WEIGHTS), _strip(tensors, OBSERVERS)


def control_variates(tensors):
    """SCAFFOLD's control variates of a prefixed update or global model (empty without)."""
    return _strip(tensors, CONTROLS)


def join(weights, observer_stats, controls=None):
    """The prefixed form of (weights, observer statistics, control variates)."""
    return {**{WEIGHTS + k: v for k, v in weights.items()},
            **{OBSERVERS + k: v for k, v in observer_stats.items()},
            **{CONTROLS + k: v for k, v in (controls or {}).items()}}
