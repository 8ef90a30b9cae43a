"""Observer statistics and float state: what travels between sites.

Statistics are flat dicts of plain contiguous float32 tensors keyed
"<observer module path>.<min_val|max_val|histogram>", so they fit in safetensors.
Merging min/max ranges across sites is exact (min of mins, max of maxes equals
observing all sites' data at once); histograms are re-binned onto the common range.
"""

from collections import defaultdict

import numpy as np
import torch
from torch import fx, nn

from . import _ao, _pt2e
from .errors import QuantizationError

_STAT_NAMES = ("min_val", "max_val", "histogram")


# --- observer statistics ---------------------------------------------------------


def _observer_classes() -> tuple:
    return (_ao.ObserverBase, *_pt2e.observer_classes())  # torch.ao's (FX, eager), torchao's (pt2e)


def _fake_quant_classes() -> tuple:
    return (_ao.FakeQuantizeBase, *_pt2e.fake_quant_classes())


def _observers(model: nn.Module):
    observer_classes = _observer_classes()
    return {path: m for path, m in model.named_modules() if isinstance(m, observer_classes)}


def weight_observer_paths(prepared: nn.Module) -> set:
    """Observers whose input depends on no model input (a weight, or ops on weights alone, as
    PT2E's per-channel weight observers): what they record is a function of the weights only, the
    same at every site that holds the same model. Eager-mode models observe weights at convert."""
    if not isinstance(prepared, fx.GraphModule):
        return set()
    path_of = {id(module): path for path, module in _observers(prepared).items()}
    on_data, data_observers, called = set(), set(), set()
    for node in prepared.graph.nodes:  # topological order
        if node.op == "placeholder" or any(arg in on_data for arg in node.all_input_nodes):
            on_data.add(node)
        path = path_of.get(id(prepared.get_submodule(node.target))) if node.op == "call_module" else None
        if path is not None:
            called.add(path)
            if node in on_data:  # a shared observer is a data observer if any of its inputs is
                data_observers.add(path)
    return called - data_observers


def observer_stats(prepared: nn.Module, include_weights: bool = True) -> dict:
    """Every observer's min_val / max_val (per tensor or per channel) and histogram; without the
    weight observers' (`weight_observer_paths`) when include_weights is false."""
    stats = {}
    skipped = set() if include_weights else weight_observer_paths(prepared)
    for path, observer in _observers(prepared).items():
        if path in skipped:
            continue
        for name in _STAT_NAMES:
            value = getattr(observer, name, None)
            if isinstance(value, torch.Tensor):
                stats[f"{path}.{name}"] = value.detach().cpu().to(torch.float32).contiguous().clone()
    return stats


def _by_observer(stats: dict) -> dict:
    grouped = defaultdict(dict)
    for key, value in stats.items():
        path, _, name = key.rpartition(".")
        grouped[path][name] = value
    return grouped


def _initialized(min_val: torch.Tensor, max_val: torch.Tensor) -> bool:
    """Observers start at +inf/-inf (per-tensor) or empty (per-channel) until they see data."""
    return min_val.numel() > 0 and bool(torch.isfinite(min_val).all() and torch.isfinite(max_val).all())


def rebinned(histogram: np.ndarray, low: float, high: float, edges: np.ndarray) -> np.ndarray:
    """`histogram` over [low, high] spread onto bins with `edges`, counts uniform within a bin."""
    if high <= low:  # all mass at one point
        index = np.searchsorted(edges, low, side="right") - 1
        result = np.zeros(len(edges) - 1)
        result[min(max(index, 0), len(result) - 1)] = histogram.sum()
        return result
    source_edges = np.linspace(low, high, len(histogram) + 1)
    cumulative = np.concatenate([[0.0], np.cumsum(histogram)])
    return np.diff(np.interp(edges, source_edges, cumulative))


def _merge_histograms(path: str, sites: list) -> dict:
    bins = {site["histogram"].numel() for site in sites}
    if len(bins) != 1:
        raise QuantizationError(f"merge_observer_stats: '{path}.histogram' has different bin counts {sorted(bins)}")
    seen = [s for s in sites if _initialized(s["min_val"], s["max_val"]) and float(s["histogram"].sum()) > 0]
    if not seen:
        return {name: sites[0][name].clone() for name in _STAT_NAMES}
    low = min(float(s["min_val"]) for s in seen)
    high = max(float(s["max_val"]) for s in seen)
    (num_bins,) = bins
    if high <= low:
        merged = np.sum([s["histogram"].double().numpy() for s in seen], axis=0)
    else:
        edges = np.linspace(low, high, num_bins + 1)
        merged = np.zeros(num_bins)
        for site in seen:  # fixed order: deterministic float sums
            merged += rebinned(site["histogram"].double().numpy(), float(site["min_val"]), float(site["max_val"]), edges)
    return {
        "histogram": torch.from_numpy(merged).to(torch.float32),
        "min_val": torch.tensor(low, dtype=torch.float32),
        "max_val": torch.tensor(high, dtype=torch.float32),
    }


def _merge_ranges(path: str, sites: list) -> dict:
    seen = [s for s in sites if _initialized(s["min_val"], s["max_val"])]
    if not seen:
        return {name: sites[0][name].clone() for name in ("min_val", "max_val")}
    shapes = {tuple(s["min_val"].shape) for s in seen}
    if len(shapes) != 1:
        raise QuantizationError(f"merge_observer_stats: '{path}.min_val' has different shapes {sorted(shapes)}")
    min_val, max_val = seen[0]["min_val"].clone(), seen[0]["max_val"].clone()
    for site in seen[1:]:
        min_val = torch.minimum(min_val, site["min_val"])
        max_val = torch.maximum(max_val, site["max_val"])
    return {"min_val": min_val, "max_val": max_val}


def merge_observer_stats(stats_per_site: list) -> dict:
    """One set of statistics equivalent to having observed every site's data."""
    if not stats_per_site:
        raise QuantizationError("merge_observer_stats: no statistics to merge")
    keys = set(stats_per_site[0])
    for index, stats in enumerate(stats_per_site[1:], start=1):
        if set(stats) != keys:
            differing = sorted(keys.symmetric_difference(stats))
            raise QuantizationError(
                f"merge_observer_stats: site {index} has different observer keys than site 0: {differing[:5]}"
            )
    per_site = [_by_observer(stats) for stats in stats_per_site]
    merged = {}
    for path in sorted(per_site[0]):
        sites = [grouped[path] for grouped in per_site]
        combined = _merge_histograms(path, sites) if "histogram" in sites[0] else _merge_ranges(path, sites)
        merged.update({f"{path}.{name}": value.contiguous() for name, value in combined.items()})
    return merged


def _assign_buffer(module: nn.Module, name: str, value: torch.Tensor) -> None:
    current = getattr(module, name)
    # assignment (not copy_) because per-channel buffers change shape after first use
    setattr(module, name, value.detach().to(device=current.device, dtype=current.dtype).clone())


def load_observer_stats(prepared: nn.Module, stats: dict, include_weights: bool = True) -> None:
    """Write statistics into the observers and refresh fake-quant scale / zero_point; `stats`
    holds the weight observers' too unless include_weights is false (they keep their own)."""
    expected = set(observer_stats(prepared, include_weights))
    if set(stats) != expected:
        missing, unexpected = sorted(expected - set(stats)), sorted(set(stats) - expected)
        raise QuantizationError(
            f"load_observer_stats: keys do not match the model's observers "
            f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    observers = _observers(prepared)
    for key, value in stats.items():
        path, _, name = key.rpartition(".")
        _assign_buffer(observers[path], name, value)
    fake_quant_classes = _fake_quant_classes()
    for module in prepared.modules():
        if isinstance(module, fake_quant_classes) and hasattr(module, "activation_post_process"):
            with _pt2e.quiet():
                scale, zero_point = module.calculate_qparams()
            _assign_buffer(module, "scale", scale)
            _assign_buffer(module, "zero_point", zero_point)


# --- float state -------------------------------------------------------------------


def _quantization_internal_prefixes(model: nn.Module):
    internal_classes = _observer_classes() + _fake_quant_classes()
    return tuple(
        f"{path}."
        # shared observers (FX reuses one for ops that keep qparams) appear under every name
        for path, module in model.named_modules(remove_duplicate=False)
        if path and isinstance(module, internal_classes)
    )


def float_state(model: nn.Module) -> dict:
    """The state FedAvg should average: parameters and buffers, no observer internals."""
    internal = _quantization_internal_prefixes(model)
    return {key: value for key, value in model.state_dict().items() if not key.startswith(internal)}


def load_float_state(model: nn.Module, state: dict) -> None:
    """Inverse of float_state: every float key must be present, nothing else."""
    expected = set(float_state(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise QuantizationError(
            f"load_float_state: state does not fit {type(model).__name__} "
            f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise QuantizationError(f"load_float_state: {error}") from error
