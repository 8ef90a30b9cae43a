"""Secure aggregation (`secure_aggregation: true`): the coordinator sees sums only.

Every message whose content the coordinator only needs summed travels through FeatureCloud's
SMPC: each site (the coordinator too) sends a flat JSON list of numbers under the memo; the
controller turns every number into fixed point `int(x * 10**exponent)`, secret-shares and sums
them, and posts one aggregate (floats again) to the coordinator. What the sums are:

| memo | each site sends | the coordinator gets |
|---|---|---|
| `counts` | [n_train, n_test] (+ its training label counts with logit_adjustment) | the federation's totals N, T (and label counts) |
| `update_<r>` | (n_i/N) * (weights, control variates, train loss, train accuracy) | the weighted averages |
| `dp_sum_<r>_<s>` | dp.noise distributed: its clipped gradient sum + its share of the noise | DP-SGD's noisy gradient sum of step s |
| `test_<r>` | [n_test * loss, n_test * accuracy, n_validation, n_validation * (loss, accuracy)] | T * the federation's test figures, V and V * its validation figures |
| `calibration_range` | power-of-two magnitude counts of its activations | a range holding all sites' |
| `calibration` | its activation histograms on the common grid | the federation's histograms |
| `results` | [1, n_train, n_test, n_test * (fp32 and int8 accuracy and loss)] | the sums |

Plain (not summed) are only what is no site's data: `summary` (input shape, number of classes),
and the coordinator's broadcasts (`global_<r>`, `dp_model_<r>_<s>`, `calibration_grid`, `qparams`,
`final`), all made from sums.

Fixed point: a message whose entries are bounded by B (|x| <= B, refused at the site otherwise)
is sent with the largest exponent e for which n_sites * B * 10**e < 2**63, so no sum of
fixed-point values can overflow a signed 64-bit integer, whatever the controller's integers
are. Update entries are (n_i/N) * w with |w| <= WEIGHT_BOUND = 1e4: e = 14 for 3 sites (12 up
to 900 sites), an absolute error below n_sites * 1e-14, far under float32's resolution of any
weight above 1e-6. Counts and count-weighted figures (B = 1e13) keep 5 decimals; histogram
counts (B = 1e12) keep 6.
"""
import json
import math
from dataclasses import dataclass

import numpy as np
import torch

from federation import payload
from federation.checks import SiteMismatchError, UpdateError
from federation.messages import ModelMessage, round_memo
from federation.summary import check_sites_fit
from inputs.errors import InputError
from quant import secure_stats
from training.privacy import (NoisyGradientDescent, PrivacyError, distributed_plan, gradient_sum_bound,
                              resolve_colluding_sites)

WEIGHT_BOUND = 1e4      # |weight|, |control variate|, |train loss| a site may send
FIGURE_BOUND = 1e4      # |loss| in test and results figures
COUNT_BOUND = 1e9       # samples per site
HISTOGRAM_BOUND = 1e12  # one histogram bin's count
INT64_LIMIT = 2 ** 63
SECURE_MEMOS = ("counts", "update_<r>", "dp_sum_<r>_<s>", "test_<r>", "calibration_range", "calibration", "results")


class SecureAggregationError(ValueError):
    """A value cannot travel as a fixed-point sum (out of bounds), or an aggregate is malformed."""


def exponent_for(bound, n_sites):
    """The largest decimal exponent e with n_sites * bound * 10**e < 2**63."""
    exponent = math.floor(math.log10(INT64_LIMIT / (n_sites * bound)))
    while n_sites * bound * 10 ** exponent >= INT64_LIMIT:
        exponent -= 1
    if exponent < 0:
        raise SecureAggregationError(f"{n_sites} sites with values up to {bound:g} cannot be summed "
                                     "in 64-bit fixed point")
    return min(exponent, 15)


@dataclass
class Contribution:
    """One site's share of a secure sum: what it sends and how."""
    memo: str
    vector: list        # flat JSON numbers
    exponent: int       # fixed-point decimals for the controller
    plain_bytes: int    # what the same content costs as a plain (safetensors) message


def checked_vector(values, bound, what):
    """`values` as a flat list of floats, each finite and within +-bound (else refused here,
    at the site, before anything leaves it)."""
    array = np.asarray(values, dtype=np.float64).ravel()
    bad = ~np.isfinite(array) | (np.abs(array) > bound)
    if bad.any():
        index = int(np.argmax(bad))
        raise SecureAggregationError(
            f"secure aggregation: {what} has the value {array[index]!r} at position {index}, beyond "
            f"the fixed-point bound {bound:g} (values must be finite with magnitude <= {bound:g} "
            "so that the controller's fixed-point sum keeps float32 precision and cannot overflow)")
    return array.tolist()


def significant(values, digits=9):
    """`values` rounded to `digits` significant decimal digits: float32's full precision (9
    digits round-trip any float32), in fewer JSON characters than float64's 17."""
    array = np.asarray(values, dtype=np.float64)
    magnitude = np.floor(np.log10(np.abs(array), out=np.zeros_like(array), where=array != 0))
    scale = 10.0 ** (digits - 1 - magnitude)
    return np.round(array * scale) / scale


def decode_sum(data, length, memo):
    """The controller's aggregate (JSON bytes) as a float64 array of `length` numbers."""
    try:
        values = json.loads(bytes(data))
    except (ValueError, TypeError, UnicodeDecodeError) as error:
        raise UpdateError(f"the secure aggregate under memo '{memo}' is not JSON: {error}") from None
    if not isinstance(values, list) or len(values) != length or not all(
            isinstance(value, (int, float)) and not isinstance(value, bool) for value in values):
        raise UpdateError(f"the secure aggregate under memo '{memo}' is not a list of {length} numbers")
    array = np.asarray(values, dtype=np.float64)
    if not np.isfinite(array).all():
        raise UpdateError(f"the secure aggregate under memo '{memo}' has non-finite values")
    return array


@dataclass(frozen=True)
class Sum:
    """The controller's aggregate under one memo, as the coordinator receives it (JSON bytes)."""
    memo: str
    data: bytes

    def values(self, length):
        return decode_sum(self.data, length, self.memo)


def _schema(codec):
    return sorted(codec.model_schema.items())


def flatten(tensors, schema):
    return np.concatenate([tensors[name].detach().double().reshape(-1).numpy() for name, _ in schema]
                          + [np.zeros(0)])


def unflatten(vector, schema):
    """Tensors by name from a flat vector; integer entries (counters) are rounded."""
    tensors, offset = {}, 0
    for name, (shape, dtype) in schema:
        size = math.prod(shape)
        values = torch.from_numpy(np.array(vector[offset:offset + size])).reshape(shape)
        tensors[name] = values.round().to(dtype) if not dtype.is_floating_point else values.to(dtype)
        offset += size
    return tensors


def _length(schema):
    """How many numbers the flat vector of `schema`'s tensors holds."""
    return sum(math.prod(shape) for _, (shape, _) in schema)


def _parameter_schema(site):
    """The trainable parameters in model order: what a DP-SGD gradient sum holds."""
    return [(name, (tuple(parameter.shape), torch.float32))
            for name, parameter in site.local.model.named_parameters() if parameter.requires_grad]


def _plain_size(values):
    return len(payload.encode({"values": torch.tensor(values, dtype=torch.float32)}, {}))


# ---- one site's side ------------------------------------------------------------------------

def _check_colluding_sites(site, n_sites):
    """dp.colluding_sites against the federation's size, at start (config.yml cannot know it)."""
    settings = site.local.dp
    if settings is not None and settings.distributed:
        try:
            resolve_colluding_sites(settings.colluding_sites, n_sites)
        except PrivacyError as error:
            raise InputError(site.inputs.config_file, str(error), key="dp") from None


class SecureSite:
    """What a Site sends under secure aggregation, and the totals it needs (from `global_0`)."""

    def __init__(self, site, n_sites):
        self.site = site
        self.n_sites = n_sites
        _check_colluding_sites(site, n_sites)
        self.n_train_total = None
        self.grid = None
        self.dp_plan = None  # dp.noise distributed: the steps every site takes alike
        self.sent = {}  # memo -> what it cost (metrics.json "privacy"; a round's steps add up)

    def record(self, contribution, json_bytes, seconds):
        memo = round_memo(contribution.memo)
        entry = self.sent.setdefault(memo, {"json_bytes": 0, "plain_bytes": 0, "exponent": contribution.exponent,
                                            "numbers": len(contribution.vector), "send_seconds": 0.0, "sums": 0})
        entry["json_bytes"] += json_bytes
        entry["plain_bytes"] += contribution.plain_bytes
        entry["send_seconds"] += seconds
        entry["sums"] += 1

    def _exponent(self, bound):
        return exponent_for(bound, self.n_sites)

    def summary_message(self):
        """What the coordinator checks (shapes), without this site's sample counts."""
        summary = self.site.inputs.summary()
        return self.site.codec.encode_report({"input_shape": summary["input_shape"],
                                              "n_classes": summary["n_classes"]})

    def counts(self):
        summary = self.site.inputs.summary()
        values = [summary["n_train"], summary["n_test"]]
        if self.site.config.logit_adjustment > 0:
            values += self.site.inputs.label_counts()  # one per class score: the same length everywhere
        vector = checked_vector(values, COUNT_BOUND, "the sample counts")
        return Contribution("counts", vector, self._exponent(COUNT_BOUND), _plain_size(vector))

    def receive_totals(self, meta):
        """The federation's totals, from the first global model's metadata; with dp.noise
        distributed they fix the sampling rate, the steps and the noise every site uses."""
        self.n_train_total = meta["n_train_total"]
        settings, config = self.site.local.dp, self.site.config
        if settings is not None and settings.distributed:
            self.dp_plan = distributed_plan(settings, self.n_train_total, self.n_sites, config.max_iter, config.epochs)
            self.site.local.start_distributed_dp(self.dp_plan)

    @property
    def distributed_dp(self):
        return self.dp_plan is not None

    def dp_sum(self, memo):
        """One step of distributed DP-SGD: this site's clipped gradient sum plus its noise share."""
        with self.site.timed("train"):
            gradient = self.site.local.noisy_gradient_sum()
        schema = _parameter_schema(self.site)
        vector = checked_vector(significant(flatten(gradient, schema)), WEIGHT_BOUND,
                                "this site's noisy gradient sum")
        return Contribution(memo, vector, self._exponent(WEIGHT_BOUND), _plain_size(vector))

    def update(self, memo):
        """Train one round; the update as (n_i/N) * (model entries, train loss, train accuracy)."""
        message = self.site.train_round_message()
        fraction = message.meta["n_train"] / self.n_train_total
        joined = message.joined()
        values = np.concatenate([flatten(joined, _schema(self.site.codec)),
                                 [message.meta["train_loss"], message.meta["train_accuracy"]]])
        vector = checked_vector(significant(values * fraction), WEIGHT_BOUND, "this site's update (weights, "
                                "control variates or train loss, times its share of the samples)")
        return Contribution(memo, vector, self._exponent(WEIGHT_BOUND),
                            len(self.site.codec.encode_model(message)))

    def test(self, memo):
        """Test and validation figures, each times its sample count (validation: 0 without a split)."""
        figures = self.site.evaluate_global_figures()
        n, n_validation = figures["n_test"], figures["n_validation"]
        validation = [n_validation * figures["validation_loss"], n_validation * figures["validation_accuracy"]] \
            if n_validation else [0, 0]
        vector = checked_vector([n * figures["test_loss"], n * figures["test_accuracy"], n_validation, *validation],
                                COUNT_BOUND * FIGURE_BOUND, "the test figures")
        return Contribution(memo, vector, self._exponent(COUNT_BOUND * FIGURE_BOUND),
                            len(self.site.codec.encode_report(figures)))

    def calibration_range(self):
        """post_static: observe this site's train data; the magnitude counts of its histograms."""
        self.site.calibration_message()  # calibrates; own_stats stays here
        with self.site.timed("quantize"):
            vector = checked_vector(secure_stats.magnitude_counts(self.site.own_stats), HISTOGRAM_BOUND,
                                    "the calibration magnitude counts")
        return Contribution("calibration_range", vector, self._exponent(HISTOGRAM_BOUND), _plain_size(vector))

    def receive_grid(self, sender, data):
        self.grid = self.site.codec.decode_report(sender, data)["grid"]

    def calibration(self):
        with self.site.timed("quantize"):
            vector = checked_vector(secure_stats.histograms_on_grid(self.site.own_stats, self.grid),
                                    HISTOGRAM_BOUND, "the calibration histograms")
        return Contribution("calibration", vector, self._exponent(HISTOGRAM_BOUND),
                            len(self.site.codec.encode_stats(self.site.own_stats)))

    def results(self):
        results = self.site.measure_results()
        n = results["n_test"]
        values = [1, results["n_train"], n]
        for precision in ("fp32", "int8"):
            values += [n * results[precision]["accuracy"], n * results[precision]["loss"]]
        values += [n * artifact["accuracy"] for artifact in results["artifacts"]]  # same files everywhere
        vector = checked_vector(values, COUNT_BOUND * FIGURE_BOUND, "the results figures")
        return Contribution("results", vector, self._exponent(COUNT_BOUND * FIGURE_BOUND),
                            len(self.site.codec.encode_report(results)))


# ---- the coordinator's side -----------------------------------------------------------------

class SecureCoordinator:
    """The Coordinator's work from sums: it never holds a single other site's update, figures
    or statistics. Each sum arrives as a `Sum`; broadcasts are the same plain messages as
    without secure aggregation."""

    def __init__(self, coordinator, n_sites):
        self.coordinator = coordinator
        self.n_sites = n_sites
        self.totals = None
        self.grid = None
        self.dp_plan = None        # dp.noise distributed: the steps' schedule and noise
        self.noisy_descent = None  # and the SGD step on the noisy sums
        self._dp_round = None

    @property
    def codec(self):
        return self.coordinator.codec

    @property
    def rounds(self):
        return self.coordinator.rounds

    def check_summaries(self, pieces):
        summaries = []
        for sender, data in pieces:
            summary = self.codec.decode_report(sender, data)
            if not isinstance(summary.get("input_shape"), list) or isinstance(summary.get("n_classes"), bool) \
                    or not isinstance(summary.get("n_classes"), int):
                raise SiteMismatchError(f"site {sender} sent a summary without input_shape and n_classes")
            summaries.append((sender, summary))
        check_sites_fit(summaries)

    def first_global(self, counts):
        """The initial model, with the federation's totals the sites weight their updates by."""
        site = self.coordinator.site
        adjusting = site.config.logit_adjustment > 0
        values = counts.values(2 + (site.inputs.n_outputs if adjusting else 0))
        self.totals = {"n_train": int(round(values[0])), "n_test": int(round(values[1]))}
        if min(self.totals.values()) < 1:
            raise SiteMismatchError(f"the federation's sample counts {self.totals} are not positive")
        settings, config = self.coordinator.site.local.dp, self.coordinator.site.config
        if settings is not None and settings.distributed:
            self.dp_plan = distributed_plan(settings, self.totals["n_train"], self.n_sites, config.max_iter,
                                            config.epochs)
            self.noisy_descent = NoisyGradientDescent(settings, self.dp_plan.expected_batch)
        label_counts = {"label_counts": [int(round(value)) for value in values[2:]]} if adjusting else {}
        message = self.coordinator.site.local_message(n_train_total=self.totals["n_train"], **label_counts)
        return self.codec.encode_model(message)

    def aggregate(self, update_sum):
        """The next global model from the sum of (n_i/N) * updates: the weighted average; the
        rule steps from the previous global as without secure aggregation."""
        schema = _schema(self.codec)
        size = _length(schema)
        vector = update_sum.values(size + 2)
        averaged = ModelMessage.split(unflatten(vector[:size], schema))
        self.coordinator._update_meta = [{"n_train": self.totals["n_train"], "train_loss": float(vector[size]),
                                          "train_accuracy": float(vector[size + 1])}]
        rule = self.coordinator.rule
        previous = ModelMessage.split(self.codec.last_global)
        weights = rule.step(previous.weights, averaged.weights, self.coordinator.site.parameter_names())
        latest = self.rounds[-1]["test_accuracy"] if self.rounds else None
        return self.codec.encode_model(ModelMessage(weights, averaged.observers, averaged.controls,
                                                    {"federation_accuracy": latest}))

    def step_on_noisy_sum(self, gradient_sum, round_number):
        """dp.noise distributed: the next model from step s's summed noisy gradient (broadcast
        as `dp_model_<r>_<s>`); SGD's momentum restarts each round with keep_optimizer_state false."""
        site = self.coordinator.site
        if round_number != self._dp_round and not site.config.keep_optimizer_state:
            self.noisy_descent.reset()
        self._dp_round = round_number
        schema = _parameter_schema(site)
        summed = gradient_sum.values(_length(schema))
        self._check_gradient_sum(summed, gradient_sum.memo)
        gradient = unflatten(summed, schema)
        current = ModelMessage.split(self.codec.last_global)
        weights = self.noisy_descent.step(current.weights, gradient)
        return self.codec.encode_model(ModelMessage(weights, current.observers, current.controls,
                                                    {"federation_accuracy": None}))

    def _check_gradient_sum(self, summed, memo):
        """A sum larger than the union's clipped gradients plus the noise can be means some site
        sent more than its clipped gradient sum: stop (secure aggregation hides which site)."""
        settings = self.coordinator.site.local.dp
        bound = gradient_sum_bound(self.dp_plan, settings.max_grad_norm, len(summed))
        norm = float(np.linalg.norm(summed))
        if norm > bound:
            raise UpdateError(f"the secure sum under memo '{memo}' has norm {norm:.4g}, more than the "
                              f"{bound:.4g} that the union's gradients clipped to max_grad_norm "
                              f"{settings.max_grad_norm:g} plus the DP noise can reach: a site sent more "
                              "than its clipped gradient sum (the secure sum hides which one)")

    def record_round(self, round_number, test_sum):
        test_loss, test_accuracy, n_validation, *validation = test_sum.values(5)
        n_validation = int(round(n_validation))
        validation_loss, validation_accuracy = (float(value / n_validation) for value in validation) \
            if n_validation > 0 else (None, None)
        (update,) = self.coordinator._update_meta
        row = {"round": round_number, "train_loss": update["train_loss"],
               "train_accuracy": update["train_accuracy"], "test_loss": float(test_loss / self.totals["n_test"]),
               "test_accuracy": float(test_accuracy / self.totals["n_test"]),
               "validation_loss": validation_loss, "validation_accuracy": validation_accuracy}
        self.rounds.append(row)
        return row

    def decide(self):
        """As without secure aggregation: from the federation's validation loss (a sum)."""
        return self.coordinator.decide()

    def calibration_grid(self, range_sum, own_stats):
        """The common histogram range of every observer (broadcast as `calibration_grid`)."""
        paths = list(secure_stats.histogram_observers(own_stats))
        summed = range_sum.values(len(paths) * 2 * secure_stats.N_BUCKETS)
        self.grid = secure_stats.grid_from_counts(summed, paths)
        return self.codec.encode_report({"grid": self.grid})

    def merge_calibration(self, histogram_sum, own_stats):
        """The federation's observer statistics from the summed histograms (`qparams`)."""
        paths = list(secure_stats.histogram_observers(own_stats))
        summed = histogram_sum.values(len(paths) * secure_stats.FINE_BINS)
        return self.codec.encode_stats(secure_stats.stats_from_summed_histograms(summed, self.grid, own_stats))

    def final(self, results_sum):
        own_files = self.coordinator.site.artifacts
        values = results_sum.values(7 + len(own_files))
        n_sites, n_train, n_test = (int(round(value)) for value in values[:3])
        figures = {"n_sites": n_sites, "n_train": n_train, "n_test": n_test}
        for index, precision in enumerate(("fp32", "int8")):
            figures[precision] = {"accuracy": float(values[3 + 2 * index] / n_test),
                                  "loss": float(values[4 + 2 * index] / n_test)}
        # Each int8 file's accuracy over all test sets; its size and SHA-256 are the coordinator's
        # own (no single site's report reaches it, so the files' identity is not compared here).
        figures["artifacts"] = [{"file": own["file"], "size_bytes": own["size_bytes"], "sha256": own["sha256"],
                                 "digest": own["digest"], "accuracy": float(total / n_test)}
                                for own, total in zip(own_files, values[7:])]
        return self.codec.encode_report({"rounds": self.rounds, "figures": figures, "sites": []})
