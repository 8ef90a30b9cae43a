"""Federated averaging of whole state_dicts."""
import torch


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
