"""The checks every message from another site passes: tensors against the expected schema,
reports against their fields. Each error names the sending site."""
import torch


class UpdateError(ValueError):
    """Tensors from another site do not fit the local model; names the sending site."""


class SiteMismatchError(ValueError):
    """The sites' data do not fit together, or a site sent malformed figures; names the site."""


def schema_of(tensors):
    """name -> (shape, dtype): what a message's tensors must look like."""
    return {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in tensors.items()}


def check_tensors(schema, tensors, sender, allow_infinite=False):
    """Raise UpdateError unless `tensors` has exactly the schema's keys, shapes and dtypes,
    all finite. `allow_infinite`: for observer statistics, where an observer that saw no data
    keeps its initial +-inf range; NaN is still refused."""
    missing = sorted(set(schema) - set(tensors))
    extra = sorted(set(tensors) - set(schema))
    if missing or extra:
        raise UpdateError(f"update from site {sender} does not match the model: "
                          f"missing {missing[:5]}, unexpected {extra[:5]}")
    for name, (shape, dtype) in schema.items():
        got = tensors[name]
        if tuple(got.shape) != shape or got.dtype != dtype:
            raise UpdateError(f"update from site {sender}: '{name}' is {got.dtype}{list(got.shape)}, "
                              f"expected {dtype}{list(shape)}")
        if not got.is_floating_point():
            continue
        if torch.isnan(got).any() or not (allow_infinite or torch.isfinite(got).all()):
            raise UpdateError(f"update from site {sender}: '{name}' has NaN or infinite values")


_NUMBER = (int, float)
# What each report must hold: key -> accepted types (bool is excluded from numbers below).
REPORT_FIELDS = {
    "summary": {"n_train": int, "n_test": int, "input_shape": list, "n_classes": int},
    "update": {"n_train": int, "train_loss": _NUMBER, "train_accuracy": _NUMBER},
    "test": {"n_test": int, "test_loss": _NUMBER, "test_accuracy": _NUMBER},
    "results": {"n_train": int, "n_test": int, "fp32": dict, "int8": dict},
    "figures": {"accuracy": _NUMBER, "loss": _NUMBER},
}


def check_report(kind, meta, sender):
    """Raise SiteMismatchError unless `meta` has the fields a `kind` report needs, sensibly typed.

    Figures from other sites feed the weighted means; a count that is not a positive integer or
    a figure that is not a number would silently skew them.
    """
    for key, types in REPORT_FIELDS[kind].items():
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, types):
            raise SiteMismatchError(f"site {sender} sent a {kind} report whose '{key}' is {value!r}")
        if key.startswith("n_") and value < 1:
            raise SiteMismatchError(f"site {sender} sent a {kind} report whose '{key}' is {value!r}")
    if kind == "results":
        for precision in ("fp32", "int8"):
            check_report("figures", meta[precision], sender)
