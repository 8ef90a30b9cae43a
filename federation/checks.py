"""The checks every message from another site passes: tensors against the expected schema,
reports against their fields. Each error names the sending site."""
import math

import torch


class PeerMessageError(ValueError):
    """What another site sent is refused. The message names the site; `sender` and `problem`
    make the controller's 40-character status ('bad update: NaN from #2 3f2a9c1e', by the
    engine wrapper), where the whole message would be cut before the site's name."""

    problem = "bad message"

    def __init__(self, message, sender=None, problem=None):
        super().__init__(message)
        self.sender = sender
        self.problem = problem or self.problem


class UpdateError(PeerMessageError):
    """Tensors from another site do not fit the local model; names the sending site."""

    problem = "bad update"


class SiteMismatchError(PeerMessageError):
    """The sites' data do not fit together, or a site sent malformed figures; names the site."""

    problem = "bad report"


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
                          f"missing {missing[:5]}, unexpected {extra[:5]}", sender, "update: wrong keys")
    for name, (shape, dtype) in schema.items():
        got = tensors[name]
        if tuple(got.shape) != shape or got.dtype != dtype:
            raise UpdateError(f"update from site {sender}: '{name}' is {got.dtype}{list(got.shape)}, "
                              f"expected {dtype}{list(shape)}", sender, "update: wrong shape")
        if not got.is_floating_point():
            continue
        if torch.isnan(got).any() or not (allow_infinite or torch.isfinite(got).all()):
            raise UpdateError(f"update from site {sender}: '{name}' has NaN or infinite values", sender,
                              "update: NaN/inf")


# ---- reports ------------------------------------------------------------------------------
# Everything another site claims is range-checked before it is used: counts feed the weights
# of every average, figures feed the federation's weighted means and every site's metrics.json.
MAX_COUNT = 10 ** 9          # samples at one site (n_train, n_test)
MAX_TOTAL = 10 ** 12         # samples over a federation (the `final` message's sums)
MAX_SITES = 10 ** 4
MAX_ROUNDS = 10 ** 5
MAX_CLASSES = 10 ** 6
MAX_SITE_ID = 128            # characters of a site id


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _power(number):
    exponent = round(math.log10(number))
    return f"10**{exponent}" if number == 10 ** exponent and exponent > 3 else str(number)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Field:
    """One report field: a check and, for the error message, what it demands."""

    def __init__(self, demand, check, optional=False):
        self.demand, self.check, self.optional = demand, check, optional

    def errors(self, value, path):
        """(path, value, demand) of the first problem, or None."""
        if value is None and self.optional:
            return None
        return None if self.check(value) else (path, value, self.demand)


def count(limit=MAX_COUNT, low=1):
    return Field(f"an integer in {low}..{_power(limit)}", lambda v: _is_int(v) and low <= v <= limit)


def fraction(optional=False):
    return Field("a number in [0, 1]" + (" or null" if optional else ""),
                 lambda v: _is_number(v) and 0 <= v <= 1, optional)  # NaN fails both comparisons


def non_negative(optional=False):
    return Field("a finite number >= 0" + (" or null" if optional else ""),
                 lambda v: _is_number(v) and 0 <= v < math.inf, optional)


def flag():
    return Field("true or false", lambda v: isinstance(v, bool))


SHAPE = Field("a list of 1 to 8 integers in 1..10**6",
              lambda v: isinstance(v, list) and 1 <= len(v) <= 8 and all(_is_int(d) and 1 <= d <= 10 ** 6 for d in v))
SITE_ID = Field(f"a site id (text of 1 to {MAX_SITE_ID} characters, or an integer)",
                lambda v: (isinstance(v, str) and 1 <= len(v) <= MAX_SITE_ID) or (_is_int(v) and 0 <= v <= MAX_COUNT))


class Record:
    """A nested report: a dict whose fields are checked in turn."""

    def __init__(self, fields):
        self.fields = fields

    def errors(self, value, path):
        if not isinstance(value, dict):
            return path or "(the report)", value, "a JSON object"
        for key, spec in self.fields.items():
            problem = spec.errors(value.get(key), f"{path}.{key}" if path else key)
            if problem:
                return problem
        return None


class ListOf:
    def __init__(self, item, limit):
        self.item, self.limit = item, limit

    def errors(self, value, path):
        if not isinstance(value, list) or len(value) > self.limit:
            return path, value, f"a list of at most {_power(self.limit)} entries"
        for index, item in enumerate(value):
            problem = self.item.errors(item, f"{path}[{index}]")
            if problem:
                return problem
        return None


FIGURES = {"accuracy": fraction(), "loss": non_negative()}
# The int8 model's files, each measured in its own runtime (quant.measure_artifact); the SHA-256
# lets the coordinator see that every site holds the same bytes.
HEX_DIGEST = Field("64 hexadecimal digits", lambda v: isinstance(v, str) and len(v) == 64
                   and all(c in "0123456789abcdef" for c in v))
ARTIFACT_NAMES = ("model_int8.pt", "model_int8.pte", "model_int8.onnx", "model_int8.pt2")
ARTIFACT = Record({"file": Field(f"one of {', '.join(ARTIFACT_NAMES)}", lambda v: v in ARTIFACT_NAMES),
                   "accuracy": fraction(), "size_bytes": count(10 ** 12),
                   "sha256": HEX_DIGEST, "digest": HEX_DIGEST})
ARTIFACTS = ListOf(ARTIFACT, len(ARTIFACT_NAMES))
# Validation figures are null where no site has a validation split (validation_fraction: 0).
ROUND_ROW = Record({"round": count(MAX_ROUNDS), "train_loss": non_negative(), "train_accuracy": fraction(),
                    "test_loss": non_negative(), "test_accuracy": fraction(),
                    "validation_loss": non_negative(optional=True), "validation_accuracy": fraction(optional=True)})
# Each site as the coordinator saw it: what it claimed, the share of the averaging weight it got,
# the rounds its update was left out of (robust aggregation: federation/robust.py).
SITE_ROW = Record({"id": SITE_ID, "n_train": count(), "weight": fraction(),
                   "excluded_rounds": ListOf(count(MAX_ROUNDS), MAX_ROUNDS)})


def label_counts(limit):
    """Per-class sample counts (logit_adjustment), absent without it."""
    return Field(f"a list of at most {_power(MAX_CLASSES)} integers in 0..{_power(limit)}, or absent",
                 lambda v: isinstance(v, list) and len(v) <= MAX_CLASSES and all(_is_int(c) and 0 <= c <= limit for c in v),
                 optional=True)


# What each report must hold: field -> its check (nested: Record, ListOf).
REPORT_FIELDS = {
    "summary": {"n_train": count(), "n_test": count(), "input_shape": SHAPE, "n_classes": count(MAX_CLASSES),
                "label_counts": label_counts(MAX_COUNT)},
    "update": {"n_train": count(), "train_loss": non_negative(), "train_accuracy": fraction()},
    "global": {"federation_accuracy": fraction(optional=True), "label_counts": label_counts(MAX_TOTAL)},
    "test": {"n_test": count(), "test_loss": non_negative(), "test_accuracy": fraction(),
             "n_validation": count(low=0), "validation_loss": non_negative(optional=True),
             "validation_accuracy": fraction(optional=True)},
    # The coordinator's decision after each round (federation.selection): which round's global
    # model is kept so far, its federation validation loss, whether training stops now.
    "decision": {"round": count(MAX_ROUNDS), "kept_round": count(MAX_ROUNDS), "stop": flag(),
                 "best_validation_loss": non_negative(optional=True),
                 "keep": Field("best or last", lambda v: v in ("best", "last")),
                 "patience": count(MAX_ROUNDS, low=0)},
    "results": {"n_train": count(), "n_test": count(), "fp32": Record(FIGURES), "int8": Record(FIGURES),
                "artifacts": ARTIFACTS},
    "final": {"rounds": ListOf(ROUND_ROW, MAX_ROUNDS),
              "figures": Record({"n_sites": count(MAX_SITES), "n_train": count(MAX_TOTAL),
                                 "n_test": count(MAX_TOTAL), "fp32": Record(FIGURES), "int8": Record(FIGURES),
                                 "artifacts": ARTIFACTS}),
              "sites": ListOf(SITE_ROW, MAX_SITES)},
}


def check_report(kind, meta, sender):
    """Raise SiteMismatchError unless `meta` has every field a `kind` report needs, each of the
    right type and in range: counts are integers in 1..10**9, accuracies numbers in [0, 1],
    losses finite numbers >= 0 (NaN and infinity fail).

    Figures from other sites feed the weighted averages and means; a count that is not a sane
    positive integer or a figure out of its range would silently skew them.
    """
    problem = Record(REPORT_FIELDS[kind]).errors(meta, "")
    if problem:
        path, value, demand = problem
        raise SiteMismatchError(f"site {sender} sent a '{kind}' report whose '{path}' is {_shown(value)}: "
                                f"expected {demand}", sender, f"bad {kind} report")


def _shown(value, limit=60):
    """A received value for an error message, short whatever its size."""
    if _is_int(value) and abs(value) >= 10 ** 18:
        return f"an integer of {len(str(abs(value)))} digits"  # json.loads caps ints at 4300 digits
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
