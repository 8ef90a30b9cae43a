"""Defences of the coordinator's average against updates that are well-formed but wrong.

Every message passes the format checks (federation/checks.py) first; what is left is a site
that sends a valid model far from what honest training gives, or claims more samples than it
has. Three independent defences, each a small piece of plain torch (docs/robustness.md):

- `find_outliers`: each update's L2 distance to the previous global (over the averaged
  weights), against the median distance of the other sites' updates that round. One more than
  `outlier_factor` times as far is an outlier: with `robust_aggregation: none` the coordinator
  stops the run naming the site; with a robust method the update is left out of the round.
- `capped_weights`: no site gets more than `max_site_weight` of the averaging weight, whatever
  n_train it claims (n_train cannot be verified); from 3 sites on.
- the robust combinations, chosen with `robust_aggregation` (the ideas of Flower's strategies,
  written for state_dicts):
    `norm_clip`     each update's change (update - previous global) is scaled down to the round's
                    median change norm, then weighted-averaged (norm clipping as in DP-FedAvg,
                    with the median as an adaptive bound);
    `trimmed_mean`  per coordinate, the largest and the smallest `trim` values are dropped and
                    the rest averaged, unweighted (Yin et al., 2018; Flower's FedTrimmedAvg);
    `median`        per coordinate, the median of the updates, unweighted (Yin et al., 2018;
                    Flower's FedMedian).

Integer buffers (BatchNorm's num_batches_tracked) are counters: every method keeps the largest,
as the weighted average does.
"""
import math
import statistics

import torch

from federation.aggregate import weighted_average

ROBUST_AGGREGATIONS = ("none", "norm_clip", "trimmed_mean", "median")
MIN_SITES = 3        # below it no method can tell which site is the wrong one
TRIM_FRACTION = 0.2  # trimmed_mean drops this share of the sites at each end (at least one)
# The direction check judges a round only when the other sites' cosines have at least this
# median: on the sample, honest cosines fall from 0.7 (round 1) to 0.0 (round 9, converged).
AGREEMENT_COSINE = 0.1
# The advised `min_cosine` where sites are not strongly label-skewed (docs/robustness.md); the
# check is off by default.
ADVISED_MIN_COSINE = 0.02


def update_distances(previous, states):
    """L2 norm of (state - previous) over every floating-point entry that `previous` has with
    the same shape (entries new this round, e.g. when QAT starts, have nothing to compare to)."""
    distances = []
    for state in states:
        squared = 0.0
        for name, old in previous.items():
            new = state.get(name)
            if old.is_floating_point() and new is not None and new.shape == old.shape:
                squared += (new.double() - old.double()).square().sum().item()
        distances.append(math.sqrt(squared))
    return distances


def update_changes(previous, states):
    """Each state's change (state - previous), flattened to one float64 vector over the entries
    that update_distances measures, in the same order for every state."""
    names = [name for name, old in previous.items() if old.is_floating_point()]
    changes = []
    for state in states:
        parts = [(state[name].double() - previous[name].double()).flatten() for name in names
                 if name in state and state[name].shape == previous[name].shape]
        changes.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64))
    return changes


def update_cosines(previous, states):
    """[cosine similarity of each state's change to the coordinate-wise median of the other
    states' changes] (None where either has norm 0: no direction to judge); from MIN_SITES on."""
    changes = update_changes(previous, states)
    if len(changes) < MIN_SITES or len({change.numel() for change in changes}) != 1:
        return []
    return change_cosines(changes)


def change_cosines(changes):
    """Each change's cosine with the coordinate-wise median of the others'. The median, not
    their mean: one scaled or flipped update would drag a mean away from the honest sites'
    direction, making them look like the odd ones out."""
    return [cosine(change, _coordinate_median(torch.stack(changes[:index] + changes[index + 1:])))
            for index, change in enumerate(changes)]


def cosine(one, other):
    """Cosine similarity of two flat vectors; None where either has norm 0 (no direction)."""
    norms = one.norm() * other.norm()
    return None if norms == 0 else (one @ other / norms).item()


def find_direction_outliers(changes, min_cosine, last_changes):
    """[(index, cosine, own cosine)] of the updates pointing elsewhere. `changes`: this round's
    (update_changes); `last_changes`: each site's change of the round before (None: none yet).

    An update is flagged when its change has a cosine below `min_cosine` both with the others'
    (change_cosines) and with its own previous change. Against the others alone, honest sites
    with strongly skewed labels fall below any useful bound (their data pull elsewhere), but
    they pull the same way round after round; random noise agrees with nothing, not even with
    the noise the site sent before. So a site's first round is never judged by direction.
    Flagged updates are set aside one at a time, the lowest first, and the rest measured again,
    while MIN_SITES remain: a hostile update also moves the others' reference (with 3 sites, a
    flipped one cancels the honest direction in each honest site's reference). Only while the
    others agree among themselves (median cosine at least AGREEMENT_COSINE): near convergence
    honest changes are mostly SGD noise and point nowhere in particular. `min_cosine` None: off."""
    if min_cosine is None or len({change.numel() for change in changes}) > 1:
        return []
    remaining, found = list(range(len(changes))), []
    while len(remaining) >= MIN_SITES:
        astray = _lowest_astray(changes, remaining, min_cosine, last_changes)
        if astray is None:
            break
        found.append(astray)
        remaining.remove(astray[0])
    return found


def _lowest_astray(changes, remaining, min_cosine, last_changes):
    """(index, cosine, own cosine) of the lowest-cosine update among `remaining` that fails both
    tests while the others agree, or None."""
    cosines = change_cosines([changes[index] for index in remaining])
    for cosine_, index in sorted((c, i) for i, c in zip(remaining, cosines) if c is not None and c < min_cosine):
        own = _own_cosine(changes[index], last_changes[index])
        others = [c for c in change_cosines([changes[i] for i in remaining if i != index]) if c is not None]
        if own is not None and own < min_cosine and others and statistics.median(others) >= AGREEMENT_COSINE:
            return index, cosine_, own
    return None


def _own_cosine(change, last):
    """The change's cosine with the same site's previous change; None without a comparable one."""
    if last is None or last.numel() != change.numel():
        return None
    return cosine(change, last.to(change.dtype))


def find_outliers(distances, factor):
    """[(index, ratio)] of the distances more than `factor` times the median of the others'.

    The reference leaves the site out so that two sites suffice (the median of all would sit
    between an attacker and the one honest site). A reference of 0 (the others did not move)
    judges nothing. `factor` None: no check."""
    if factor is None or len(distances) < 2:
        return []
    found = []
    for index, distance in enumerate(distances):
        reference = statistics.median(distances[:index] + distances[index + 1:])
        if reference > 0 and distance > factor * reference:
            found.append((index, distance / reference))
    return found


def capped_weights(sizes, cap):
    """The averaging weights for claimed sample counts `sizes`, no share above `cap` (a
    fraction of the total; below 1/n it cannot hold and the weights become equal). Only from
    MIN_SITES sites: with two, any cap at or below 0.5 would just make unequal sites equal.

    Shares over the cap are set to it and the rest is shared out in proportion to the sizes,
    repeatedly (water-filling), so the honest sites keep their relative weights. When no share
    is over the cap, `sizes` is returned as it is: the average stays bit for bit what it was."""
    total = sum(sizes)
    if cap is None or len(sizes) < MIN_SITES or max(sizes) <= cap * total:
        return list(sizes)
    cap = max(cap, 1 / len(sizes))
    capped = set()
    while True:
        free = [index for index in range(len(sizes)) if index not in capped]
        room = 1 - cap * len(capped)
        free_total = sum(sizes[index] for index in free)
        shares = {index: room * sizes[index] / free_total for index in free}
        over = {index for index, share in shares.items() if share > cap * (1 + 1e-12)}
        if not over:
            return [cap if index in capped else shares[index] for index in range(len(sizes))]
        capped |= over


def _per_coordinate(states, combine):
    """Apply `combine(stacked float64 values)` per floating-point entry; counters: the largest."""
    result = {}
    for name, reference in states[0].items():
        stacked = torch.stack([state[name] for state in states])
        if reference.is_floating_point():
            result[name] = combine(stacked.double()).to(reference.dtype)
        else:
            result[name] = stacked.amax(dim=0)
    return result


def weighted_mean(previous, states, weights):
    """`robust_aggregation: none`: the weighted average of the updates."""
    return weighted_average(states, weights)


def norm_clip(previous, states, weights):
    """Every change (state - previous) scaled down to at most the round's median change norm,
    then weighted-averaged. Entries without a previous value are averaged as they are."""
    norms = update_distances(previous, states)
    bound = statistics.median(norms)
    clipped = []
    for state, norm in zip(states, norms):
        scale = 1.0 if norm <= bound else bound / norm
        if scale == 1.0:
            clipped.append(state)
            continue
        clipped.append({name: _scaled_change(previous.get(name), value, scale) for name, value in state.items()})
    return weighted_average(clipped, weights)


def _scaled_change(old, new, scale):
    if old is None or not new.is_floating_point() or old.shape != new.shape:
        return new
    return (old.double() + scale * (new.double() - old.double())).to(new.dtype)


def trimmed_mean(previous, states, weights, fraction=TRIM_FRACTION):
    """Per coordinate: drop the `trim` largest and smallest values (`fraction` of the updates,
    at least one while at least three are left to average), average the rest."""
    trim = min(max(1, int(fraction * len(states))), (len(states) - 1) // 2)
    return _per_coordinate(states, lambda values: values.sort(dim=0).values[trim:len(states) - trim].mean(dim=0))


def _coordinate_median(values):
    """The median along dim 0 (for an even count, the mean of the two middle values)."""
    ordered, n = values.sort(dim=0).values, len(values)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def median(previous, states, weights):
    """Per coordinate: the median (for an even count, the mean of the two middle values)."""
    return _per_coordinate(states, _coordinate_median)


COMBINE = {"none": weighted_mean, "norm_clip": norm_clip, "trimmed_mean": trimmed_mean, "median": median}
assert tuple(COMBINE) == ROBUST_AGGREGATIONS
