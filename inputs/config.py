"""config.yml: read, validate, fill defaults. Nothing is trained before this has passed.

Two layouts are accepted: the seed's flat keys, or the same keys under a top-level
`fc_quantization:` key (FeatureCloud convention; other top-level keys then belong to
other apps of a workflow and are ignored).

The file is read with a strict loader: YAML anchors and aliases are refused (an alias bomb
of a few lines expands to gigabytes), so are duplicate keys (the last would silently win);
values are shown cut to 80 characters in error messages, and numbers that set how much work
a site does have upper bounds that say why.
"""
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

from federation.robust import ROBUST_AGGREGATIONS
from federation.rules import AGGREGATIONS
from federation.selection import KEEPS
from inputs.errors import InputError
from quant import BACKENDS, QUANT_TYPES

CONFIG_FILE = "config.yml"
APP_KEY = "fc_quantization"
MAX_CONFIG_BYTES = 2**20  # a config.yml is a few hundred bytes; this bounds reading it
SHOWN_VALUE_CHARS = 80    # values in error messages are cut to this

DEVICES = ("auto", "cpu", "cuda")
AUTO = "auto"
AUTO_AGGREGATION = AUTO
# What `logit_adjustment: auto` becomes where the config allows it (README, "Logit adjustment":
# ahead of 1 and of 0 under label skew on both datasets, level on IID data).
AUTO_LOGIT_ADJUSTMENT = 0.5
# What `model_ema: auto` becomes: (longest round in epochs, decay), the decay measured best for
# that round length, where the average spans about one epoch of training (README, "Averaging the
# rounds' models"); a round length between two measured ones takes the longer one's decay (the
# shorter average); rounds longer than half an epoch: 0 (behind with 5 x 2, mixed at 10 x 1).
AUTO_MODEL_EMA = ((0.0625, 0.925), (0.125, 0.85), (0.25, 0.7), (0.5, 0.5))
AGGREGATION_CHOICES = (AUTO_AGGREGATION, *AGGREGATIONS)
COMMUNICATIONS = ("float32", "int8")
LEARNING_RATE_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class AppConfig:
    # The seed's keys (a public contract).
    model: str
    train_dataset: str
    test_dataset: str
    batch_size: int = 32
    # Adam's; 0.002 with quant_type: qat (see _default_learning_rate). Why: README,
    # "Federated training quality".
    learning_rate: float = 0.005
    epochs: float = 1  # per round; below 1 a slice of an epoch (training.epochs)
    max_iter: int = 5
    backend: str = "x86"
    quant_type: str = "post_static"
    # Our additions.
    model_class: str = "Model"
    model_kwargs: dict = field(default_factory=dict)
    seed: int = 42
    calibration_batches: int = 32
    # Leave the layer whose output is the model's output (the classifier) in float, so the
    # logits are not rounded to 8 bits (docs/privacy.md: most of a DP-trained model's int8
    # error). auto: with dp, where the model and backend allow it; true: required.
    float_output_layer: bool | str = "auto"
    train_function: str | None = None
    # Keep each site's optimizer (Adam's moments) across rounds instead of a fresh one per round.
    keep_optimizer_state: bool = True
    # Quantization-aware training (quant_type: qat): rounds of float training before the
    # fake-quantized ones, and the rounds from which BatchNorm statistics and observers are
    # frozen (None: PyTorch's recipe, see `qat_schedule`).
    qat_warmup_rounds: int = 0
    qat_freeze_bn_round: int | None = None
    qat_freeze_observers_round: int | None = None
    # Federated training (docs/federated.md): the coordinator's aggregation (fedavg, or
    # fedavgm / fedadam with a server learning rate: null takes the aggregation's default;
    # scaffold: fedavg, or fedavgm if server_momentum is set, plus SCAFFOLD's control
    # variates at every site; auto: scaffold where the config allows it, else fedavg, see
    # `resolve_aggregation`), FedProx's proximal weight, where training runs, and how updates
    # travel.
    aggregation: str = "auto"
    server_learning_rate: float | None = None
    server_momentum: float | None = None  # None: 0.3 for fedavgm, 0 (off) for scaffold
    server_betas: tuple = (0.9, 0.99)
    server_epsilon: float = 0.001
    mu: float = 0.0
    device: str = "auto"
    communication: str = "float32"
    # Robustness against a hostile or broken site (docs/robustness.md): how the coordinator
    # combines the updates (none: the weighted average; norm_clip, trimmed_mean, median), the
    # outlier check (an update more than outlier_factor times as far from the previous global
    # as the other sites' median, per square root of its local steps, stops the run naming the
    # site, or with a robust method is left out of the round; null: no check), and the largest
    # share of the averaging weight any one site gets, whatever n_train it claims (from 3 sites
    # on; null: no cap). The random-direction check: an update whose change has |cosine| below
    # min_cosine (or a random direction's 4 standard deviations, if smaller) with every other
    # site's change, its own change the round before and the federation's last step is flagged
    # like a distance outlier (from 3 sites; null: off).
    robust_aggregation: str = "none"
    outlier_factor: float | None = 4.0
    min_cosine: float | None = 0.02
    max_site_weight: float | None = 0.5
    # A phase of local work (loading inputs, a round's training, evaluation, calibration,
    # conversion, writing outputs) that runs longer is taken to hang: the site stops with an
    # error naming the phase and the file (federation/engine.py's watchdog).
    watchdog_seconds: float = 3600
    # Privacy (docs/privacy.md): sums through FeatureCloud's SMPC instead of single updates,
    # and sample-level DP-SGD (Opacus) at every site: {epsilon, delta, max_grad_norm}.
    secure_aggregation: bool = False
    dp: dict | None = None
    # Model selection (docs/federated.md, "Validation and model selection"): the share of each
    # site's training data held out as its validation split (stratified by label, seeded; 0:
    # none), which round's global model is quantized and written (best: the lowest federation
    # validation loss; last: the last round's), and how many rounds without improvement of the
    # federation validation loss stop training early (0: never).
    validation_fraction: float = 0.1
    keep: str = "best"
    patience: int = 0
    # The exponential moving average of the rounds' global models, with this decay, is what
    # is evaluated, kept and written (0: the global model itself); training goes on from the
    # global model (README, "Averaging the rounds' models"); auto: by the round length, see
    # `resolve_model_ema`.
    model_ema: float | str = "auto"
    # Logit adjustment against label skew (training.label_shift; README, "Logit adjustment"):
    # every site trains on logits + strength * (log p_site(y) - log p_federation(y)), from its
    # own and the federation's summed label counts (0: off; auto: AUTO_LOGIT_ADJUSTMENT where
    # the config allows it, see `resolve_logit_adjustment`).
    logit_adjustment: float | str = "auto"
    # How the local learning rate changes over the rounds: constant, or cosine: round r of R
    # trains at learning_rate * (1 + cos(pi (r - 1) / R)) / 2, from the full rate in round 1
    # down to a small one in the last. Off by default: it raised centralized training but cost
    # the federation accuracy where measured (README, "A stronger centralized baseline").
    learning_rate_schedule: str = "constant"

    def round_learning_rate(self, round_number):
        """The local learning rate of round `round_number` (1-based)."""
        if self.learning_rate_schedule == "constant":
            return self.learning_rate
        progress = (round_number - 1) / self.max_iter
        return self.learning_rate * (1 + math.cos(math.pi * progress)) / 2

    @property
    def wants_float_output_layer(self):
        """float_output_layer true, or auto with dp (measured there: docs/privacy.md)."""
        return self.float_output_layer is True or (self.float_output_layer == "auto" and self.dp is not None)

    def qat_schedule(self):
        """(first QAT round, BatchNorm freeze round, observer freeze round).

        Like torchvision's recipe: BatchNorm statistics freeze one round before the observers,
        and the observers freeze for the last round, when there are enough QAT rounds for it.
        """
        first = self.qat_warmup_rounds + 1
        qat_rounds = self.max_iter - self.qat_warmup_rounds
        observers = self.qat_freeze_observers_round
        if observers is None:
            observers = self.max_iter if qat_rounds >= 2 else self.max_iter + 1
        bn = self.qat_freeze_bn_round
        if bn is None:
            bn = max(first + 1, observers - 1) if qat_rounds >= 3 else observers
        return first, bn, observers

    def to_dict(self):
        return {f.name: getattr(self, f.name) for f in fields(self)}


REQUIRED = ("model", "train_dataset", "test_dataset")

# key -> (accepted python types, check, what the check demands)
_POSITIVE_INT = ((int,), lambda v: v >= 1, "an integer >= 1")
_FILE_NAME_CHARS = 255
_RULES = {
    "model": ((str,), lambda v: v.endswith(".py") and len(v) <= _FILE_NAME_CHARS,
              "the name of a .py file in the input dir"),
    "train_dataset": ((str,), lambda v: 0 < len(v) <= _FILE_NAME_CHARS, "the name of a .pth file in the input dir"),
    "test_dataset": ((str,), lambda v: 0 < len(v) <= _FILE_NAME_CHARS, "the name of a .pth file in the input dir"),
    "batch_size": _POSITIVE_INT,
    "learning_rate": ((int, float), lambda v: 0 < v < float("inf"), "a number > 0"),
    "epochs": ((int, float), lambda v: 0 < v < float("inf"),
               "a number > 0 (passes over the train data per round; 0.5: half a pass, the next "
               "round the other half)"),
    "max_iter": _POSITIVE_INT,
    "backend": ((str,), lambda v: v in BACKENDS, f"one of {', '.join(BACKENDS)}"),
    "quant_type": ((str,), lambda v: v in QUANT_TYPES, f"one of {', '.join(QUANT_TYPES)}"),
    "model_class": ((str,), lambda v: v.isidentifier(), "a Python class name"),
    "model_kwargs": ((dict,), lambda v: all(isinstance(k, str) for k in v), "a mapping of argument names to values"),
    "seed": ((int,), lambda v: 0 <= v < 2**32, "an integer in 0..2**32-1"),
    "calibration_batches": _POSITIVE_INT,
    "float_output_layer": ((bool, str), lambda v: v in (True, False, "auto"), "true, false or auto"),
    "train_function": ((str, type(None)), lambda v: v is None or v.endswith(".py"), "the name of a .py file in the input dir"),
    "keep_optimizer_state": ((bool,), lambda v: True, "true or false"),
    "qat_warmup_rounds": ((int,), lambda v: v >= 0, "an integer >= 0"),
    "qat_freeze_bn_round": ((int, type(None)), lambda v: v is None or v >= 1, "a round number >= 1"),
    "qat_freeze_observers_round": ((int, type(None)), lambda v: v is None or v >= 1, "a round number >= 1"),
    "aggregation": ((str,), lambda v: v in AGGREGATION_CHOICES, f"one of {', '.join(AGGREGATION_CHOICES)}"),
    "server_learning_rate": ((int, float, type(None)), lambda v: v is None or 0 < v < float("inf"),
                             "a number > 0, or null for the aggregation's default"),
    "server_momentum": ((int, float, type(None)), lambda v: v is None or 0 <= v < 1, "a number in [0, 1) or null"),
    "server_betas": ((list, tuple), lambda v: len(v) == 2 and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in v),
        "two numbers in [0, 1), e.g. [0.9, 0.99]"),
    "server_epsilon": ((int, float), lambda v: 0 < v < float("inf"), "a number > 0"),
    "mu": ((int, float), lambda v: 0 <= v < float("inf"), "a number >= 0 (0: no FedProx term)"),
    "device": ((str,), lambda v: v in DEVICES, f"one of {', '.join(DEVICES)}"),
    "communication": ((str,), lambda v: v in COMMUNICATIONS, f"one of {', '.join(COMMUNICATIONS)}"),
    "robust_aggregation": ((str,), lambda v: v in ROBUST_AGGREGATIONS, f"one of {', '.join(ROBUST_AGGREGATIONS)}"),
    "outlier_factor": ((int, float, type(None)), lambda v: v is None or 1 < v < float("inf"),
                       "a number > 1 (how many times the other sites' median distance), or null for no check"),
    "min_cosine": ((int, float, type(None)), lambda v: v is None or 0 < v < 1,
                   "a number in (0, 1) (an update's change must have at least this |cosine| with "
                   "another site's change or its own last one), or null for no check"),
    "max_site_weight": ((int, float, type(None)), lambda v: v is None or 0 < v <= 1,
                        "a number in (0, 1] (a share of the total averaging weight), or null for no cap"),
    "watchdog_seconds": ((int, float), lambda v: v > 0, "a number of seconds > 0"),
    "secure_aggregation": ((bool,), lambda v: True, "true or false"),
    "dp": ((dict, type(None)), lambda v: v is None or _dp_problem(v) is None,
           "null, or {epsilon: number > 0, delta: number in (0, 1), max_grad_norm: number > 0, "
           "batch_size: whole number >= 1, learning_rate: number > 0, noise: local or distributed, "
           "colluding_sites: whole number >= 0 or all}"),
    "validation_fraction": ((int, float), lambda v: 0 <= v < 1, "a number in [0, 1) (0: no validation split)"),
    "keep": ((str,), lambda v: v in KEEPS, f"one of {', '.join(KEEPS)}"),
    "patience": ((int,), lambda v: v >= 0, "an integer >= 0 (0: no early stopping)"),
    "model_ema": ((str, int, float), lambda v: v == AUTO or (_number(v) and 0 <= v < 1),
                  "auto, or a number in [0, 1) (0: no averaging)"),
    "logit_adjustment": ((str, int, float), lambda v: v == AUTO or (_number(v) and 0 <= v <= 1),
                         "auto, or a number in [0, 1] (0: off; 1: the full correction)"),
    "learning_rate_schedule": ((str,), lambda v: v in LEARNING_RATE_SCHEDULES,
                               f"one of {', '.join(LEARNING_RATE_SCHEDULES)}"),
}
KNOWN_KEYS = tuple(f.name for f in fields(AppConfig))
assert set(KNOWN_KEYS) == set(_RULES), "every config key needs a validation rule"

# key -> (largest accepted value, why): a value past these is a typo or would keep a site
# busy for days, and in a federation every other site waits for it.
UPPER_BOUNDS = {
    "batch_size": (65536, "a larger batch does not fit in memory, and a site's data would "
                          "make a handful of steps per epoch"),
    "epochs": (1000, "local epochs per round; more lets a site drift far from the federation "
                     "and keeps every other site waiting (use more rounds instead)"),
    "max_iter": (10000, "rounds; each one exchanges the model with every site"),
    "calibration_batches": (10000, "observers settle after a few dozen batches; more only "
                                   "takes time"),
    "learning_rate": (100, "a step this large diverges"),
    "qat_warmup_rounds": (10000, "it must be less than max_iter, which is at most 10000"),
    "qat_freeze_bn_round": (10000, "a round number, and max_iter is at most 10000"),
    "qat_freeze_observers_round": (10000, "a round number, and max_iter is at most 10000"),
    "watchdog_seconds": (7 * 24 * 3600, "a week; a phase running longer than that hangs"),
    "validation_fraction": (0.5, "more than half of the training data would be held out, not trained on"),
    "patience": (10000, "rounds, and max_iter is at most 10000"),
}


class RefusedYAML(yaml.YAMLError):
    """YAML that is valid but refused: an anchor, an alias or a duplicate key."""

    def __init__(self, problem, key=None):
        super().__init__(problem)
        self.problem, self.key = problem, key


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader without anchors, aliases (and so merge keys) and duplicate keys."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        line = event.start_mark.line + 1
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            sign = "*" if isinstance(event, yaml.AliasEvent) else "&"
            raise RefusedYAML(f"line {line}: YAML anchors and aliases ({sign}{str(anchor)[:20]}) "
                              f"are not accepted; write each value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # the base class names an unhashable key
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise RefusedYAML(f"duplicate key {shorten(key)} on lines {first_line[key]} and "
                                      f"{line}; each key may appear once",
                                      key=str(key) if isinstance(key, str) else None)
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def shorten(value, limit=SHOWN_VALUE_CHARS):
    """repr(value) cut to `limit` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_yaml(path):
    """The YAML document in `path`, read with StrictLoader; InputError when it is unreadable,
    too large, not YAML, or uses what StrictLoader refuses."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "config file not found (every site needs config.yml in its input dir)")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise InputError(path, f"is {size} bytes; a config.yml of more than {MAX_CONFIG_BYTES} "
                               f"bytes is not a config")
    try:
        return yaml.load(path.read_text(), Loader=StrictLoader)  # noqa: S506 - a SafeLoader
    except RefusedYAML as error:
        raise InputError(path, error.problem, key=error.key) from None
    except yaml.YAMLError as error:
        raise InputError(path, f"not valid YAML: {error}") from None
    except RecursionError:
        raise InputError(path, "not valid YAML: nested too deeply") from None
    except UnicodeDecodeError:
        raise InputError(path, "not a text file") from None


def load_config(input_dir):
    """Read `<input_dir>/config.yml` and return a validated AppConfig (InputError otherwise)."""
    path = Path(input_dir) / CONFIG_FILE
    return parse_config(read_app_section(path), path)


def read_app_section(path):
    """The app's keys in a config.yml (flat or under `fc_quantization:`), not yet validated."""
    return _app_section(read_yaml(path), path)


def parse_config(document, path=CONFIG_FILE):
    """Validate a parsed YAML document; `path` is only used in error messages."""
    section = _app_section(document, path)
    unknown = sorted(str(key)[:SHOWN_VALUE_CHARS] for key in section if key not in _RULES)
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise InputError(path, f"unknown key(s) {shown}; known keys: {', '.join(KNOWN_KEYS)}",
                         key=unknown[0])
    for key in REQUIRED:
        if key not in section:
            raise InputError(path, "required key is missing", key=key)
    for key, value in section.items():
        _check_value(key, value, path)
    if section.get("dp") is not None:
        section["dp"] = {**DP_DEFAULTS, **section["dp"]}
    if "server_betas" in section:
        section["server_betas"] = tuple(section["server_betas"])  # frozen config, hashable
    _default_keep(section, path)
    _default_min_cosine(section)
    _default_learning_rate(section)
    config = AppConfig(**section)
    if config.quant_type == "qat" and config.qat_warmup_rounds >= config.max_iter:
        raise InputError(path, f"must be less than max_iter ({config.max_iter}), so that some "
                         "rounds train with fake quantization", key="qat_warmup_rounds")
    _check_privacy(config, path)
    if config.aggregation == "scaffold" and config.quant_type == "qat":
        # QAT renames the trained parameters mid-run; control variates are kept by name.
        raise InputError(path, "scaffold does not combine with quant_type: qat (use fedavg, "
                         "fedavgm or fedadam, or quant_type: post_static)", key="aggregation")
    return config


def resolve_aggregation(config, train_function_accepts_control):
    """(config with a concrete `aggregation`, how it was chosen): `aggregation: auto` becomes
    scaffold where the config allows it, else fedavg; an explicit rule is kept as it is.

    Every site resolves identically: the inputs are the shared config and train function file.
    Why scaffold: on label-skewed data it beats fedavg by 3 to 18 points (README, "Federated
    training quality") and ties it on IID data; it costs twice the bytes per round."""
    if config.aggregation != AUTO_AGGREGATION:
        return config, {"rule": config.aggregation, "requested": config.aggregation, "reason": "set in config.yml"}
    reason = _scaffold_excluded_by(config, train_function_accepts_control)
    rule = "fedavg" if reason else "scaffold"
    reason = reason or "no setting excludes scaffold (control variates against client drift on skewed data)"
    return replace(config, aggregation=rule), {"rule": rule, "requested": AUTO_AGGREGATION, "reason": reason}


def _scaffold_excluded_by(config, train_function_accepts_control):
    """Why `aggregation: auto` cannot be scaffold with this config, or None."""
    exclusions = (
        (config.quant_type != "post_static", f"quant_type: {config.quant_type} (scaffold needs post_static)"),
        (config.dp is not None, "dp is set (scaffold's control variates would bypass DP's noise)"),
        (config.mu != 0, f"mu: {config.mu} (FedProx; scaffold is measured without it)"),
        (not train_function_accepts_control,
         f"train_function {config.train_function} accepts no control= keyword"),
    )
    return next((why for excluded, why in exclusions if excluded), None)


def resolve_logit_adjustment(config, train_function_accepts_offset):
    """(config with a numeric `logit_adjustment`, how it was chosen): `auto` becomes
    AUTO_LOGIT_ADJUSTMENT unless dp is set or a custom train function cannot take the offset
    (then 0: off); a number set in config.yml is kept. Every site resolves identically."""
    requested = config.logit_adjustment
    if requested != AUTO:
        return config, {"strength": requested, "requested": requested, "reason": "set in config.yml"}
    exclusions = (
        (config.dp is not None, "dp is set (the offset comes from the site's label counts)"),
        (not train_function_accepts_offset,
         f"train_function {config.train_function} accepts no logit_offset= keyword"),
    )
    reason = next((why for excluded, why in exclusions if excluded), None)
    strength = 0 if reason else AUTO_LOGIT_ADJUSTMENT
    reason = reason or "no setting excludes it (against label skew; about no change on IID data)"
    return replace(config, logit_adjustment=strength), {"strength": strength, "requested": AUTO, "reason": reason}


def resolve_model_ema(config):
    """(config with a numeric `model_ema`, how it was chosen): `auto` becomes the decay of
    AUTO_MODEL_EMA for rounds of `epochs` (0 for rounds longer than half an epoch), or 0 with
    quant_type: qat or dp, where averaging was not measured; a number set in config.yml is kept.
    Every site resolves identically: the inputs are the shared config."""
    requested = config.model_ema
    if requested != AUTO:
        return config, {"decay": requested, "requested": requested, "reason": "set in config.yml"}
    exclusions = (
        (config.quant_type == "qat", "quant_type: qat (not measured; the average restarts when fake "
                                     "quantization starts)"),
        (config.dp is not None, "dp is set (not measured with DP-SGD)"),
    )
    reason = next((why for excluded, why in exclusions if excluded), None)
    longest, decay = next(((longest, decay) for longest, decay in AUTO_MODEL_EMA if config.epochs <= longest),
                          (None, 0.0))
    if reason:
        decay = 0.0
    elif decay:
        reason = (f"rounds of {config.epochs:g} epochs: the decay measured best for rounds of "
                  f"{longest:g} epochs (the average spans about one epoch)")
    else:
        reason = (f"rounds of {config.epochs:g} epochs: averaging the rounds' models was behind or mixed "
                  "for rounds longer than half an epoch")
    return replace(config, model_ema=decay), {"decay": decay, "requested": AUTO, "reason": reason}


def _default_min_cosine(section):
    """With dp the random-direction check is off unless min_cosine is set: DP-SGD's noise makes
    an honest update as unrelated to every other as random noise is (largest |cosine| 0.006
    measured at epsilon 1, LeNet on the sample: the check would stop every such run)."""
    if section.get("dp") is not None:
        section.setdefault("min_cosine", None)


# QAT trains fake-quantized from its first round: at 0.005 short runs fell far behind
# (LeNet on the sample, 5 rounds x 1 epoch: fp32 0.84-0.86 vs 0.95 at 0.002; 2 x 1: 0.57-0.64
# vs 0.88-0.90; README, "Federated training quality").
QAT_LEARNING_RATE = 0.002


def _default_learning_rate(section):
    """With quant_type: qat the default learning rate is QAT_LEARNING_RATE; a value set in
    config.yml is kept."""
    if section.get("quant_type") == "qat":
        section.setdefault("learning_rate", QAT_LEARNING_RATE)


def _default_keep(section, path):
    """Without a validation split there is nothing to select by: `keep` defaults to last, and
    keep: best or patience set explicitly are refused."""
    if section.get("validation_fraction", AppConfig.validation_fraction) > 0:
        return
    if section.get("keep") == "best":
        raise InputError(path, "keep: best selects the round of lowest federation validation loss, "
                         "but validation_fraction is 0 (no validation split); set validation_fraction "
                         "(e.g. 0.1) or keep: last", key="keep")
    if section.get("patience", 0) > 0:
        raise InputError(path, "patience stops when the federation validation loss stops improving, "
                         "but validation_fraction is 0 (no validation split); set validation_fraction "
                         "(e.g. 0.1) or patience: 0", key="patience")
    section.setdefault("keep", "last")


# batch_size and learning_rate are DP-SGD's own (SGD with momentum, expected Poisson batch);
# why these values: docs/privacy.md, "Choosing the DP defaults".
# noise: "local" (every site's DP-SGD private by itself) or "distributed" (noise shared out,
# only the secure sum private): docs/privacy.md, "Distributed noise"; colluding_sites: against
# how many colluding sites the distributed noise holds (docs/privacy.md, "Colluding sites").
DP_DEFAULTS = {"delta": 1e-5, "max_grad_norm": 1.0, "batch_size": 128, "learning_rate": 0.05, "noise": "local",
               "colluding_sites": 0}
_DP_KEYS = ("epsilon", "delta", "max_grad_norm", "batch_size", "learning_rate", "noise", "colluding_sites")
DP_NOISE = ("local", "distributed")


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _dp_problem(dp):
    """Why a `dp:` mapping is not valid, or None (delta and max_grad_norm have defaults)."""
    unknown = sorted(str(key) for key in dp if key not in _DP_KEYS)
    if unknown:
        return f"unknown key(s) {', '.join(unknown)}"
    dp = {**DP_DEFAULTS, **dp}
    if not _number(dp.get("epsilon")) or not 0 < dp["epsilon"] < float("inf"):
        return "epsilon must be a number > 0"
    if not _number(dp["delta"]) or not 0 < dp["delta"] < 1:
        return "delta must be a number in (0, 1)"
    if not _number(dp["max_grad_norm"]) or not 0 < dp["max_grad_norm"] < float("inf"):
        return "max_grad_norm must be a number > 0"
    if isinstance(dp["batch_size"], bool) or not isinstance(dp["batch_size"], int) or dp["batch_size"] < 1:
        return "batch_size must be a whole number >= 1"
    if not _number(dp["learning_rate"]) or not 0 < dp["learning_rate"] < float("inf"):
        return "learning_rate must be a number > 0"
    if dp["noise"] not in DP_NOISE:
        return f"noise must be one of {', '.join(DP_NOISE)}"
    colluding = dp["colluding_sites"]
    if colluding != "all" and (isinstance(colluding, bool) or not isinstance(colluding, int) or colluding < 0):
        return "colluding_sites must be a whole number >= 0 or all"
    return None


def _check_privacy(config, path):
    """Settings that secure aggregation or DP cannot honour are refused before anything runs."""
    if config.secure_aggregation:
        refusals = {
            "communication": (config.communication == "int8",
                              "secure_aggregation: true does not combine with communication: int8 "
                              "(int8 deltas carry each site's own per-channel scales, which the "
                              "controller cannot sum; use communication: float32)"),
            "quant_type": (config.quant_type == "qat",
                           "secure_aggregation: true does not combine with quant_type: qat (QAT "
                           "merges every site's fake-quantization ranges by their minimum and "
                           "maximum, which a sum cannot give without revealing each site's "
                           "extremes; use quant_type: post_static, calibrated from summed "
                           "histograms)"),
            # robust_aggregation belongs to another part of the app; whatever it is, a rule that
            # looks at single updates cannot work on their sum.
            "robust_aggregation": (getattr(config, "robust_aggregation", None) not in (None, "none"),
                                   "secure_aggregation: true does not combine with robust "
                                   "aggregation (it inspects every site's own update, which "
                                   "secure aggregation hides from the coordinator; use "
                                   "robust_aggregation: none)"),
        }
        for key, (refused, why) in refusals.items():
            if refused:
                raise InputError(path, why, key="secure_aggregation")
    if config.dp is not None:
        refusals = (
            (config.quant_type == "qat",
             "dp does not combine with quant_type: qat (Opacus computes per-sample gradients only "
             "for the layers it knows; QAT's fused fake-quantized layers, e.g. ConvReLU2d, are not "
             "among them, so clipping could not be guaranteed; use quant_type: post_static)"),
            (config.train_function is not None,
             "dp does not combine with train_function (the app cannot guarantee that your "
             "function clips per-sample gradients and adds the calibrated noise; DP runs the "
             "app's own training loop)"),
            (config.aggregation == "scaffold",
             "dp does not combine with aggregation: scaffold (its control variates are raw mean "
             "gradients of the site's data and would leave the site without noise)"),
            (config.mu != 0,
             "dp does not combine with mu > 0 (FedProx's proximal gradient would bypass Opacus' "
             "per-sample clipping)"),
            (config.logit_adjustment not in (0, AUTO),
             "dp does not combine with logit_adjustment (its offset comes from the site's label "
             "counts, which DP-SGD's per-sample guarantee does not cover; use logit_adjustment: 0 "
             "or auto)"),
            (config.learning_rate_schedule != "constant",
             f"dp does not combine with learning_rate_schedule: {config.learning_rate_schedule} "
             "(DP-SGD trains at dp's own learning_rate; use learning_rate_schedule: constant)"),
            (config.dp["noise"] == "distributed" and config.aggregation not in ("fedavg", AUTO_AGGREGATION),
             "dp noise: distributed does not combine with aggregation: " + str(config.aggregation)
             + " (its DP-SGD steps on the sum are the training; a server rule on top would step a "
               "second time; use aggregation: fedavg or auto)"),
            (config.dp["noise"] == "local" and config.dp["colluding_sites"] != 0,
             "dp colluding_sites applies to noise: distributed only (with noise: local every "
             "site's DP-SGD is private by itself, against the coordinator and every other site)"),
            (config.dp["noise"] == "distributed" and not config.secure_aggregation,
             "dp noise: distributed needs secure_aggregation: true (its DP-SGD steps are secure "
             "sums; unless colluding_sites is all, each site adds only a share of the noise, so "
             "its gradient sum is private only inside the controller's secure sum; without it the "
             "coordinator would see every site's barely noised gradients)"),
        )
        for refused, why in refusals:
            if refused:
                raise InputError(path, why, key="dp")


def _app_section(document, path):
    if not isinstance(document, dict):
        raise InputError(path, f"must be a mapping of keys to values, got {type(document).__name__}")
    if APP_KEY in document:
        section = document[APP_KEY]
        if not isinstance(section, dict):
            raise InputError(path, "must be a mapping of keys to values", key=APP_KEY)
        return dict(section)
    return dict(document)


def _check_value(key, value, path):
    types, check, demand = _RULES[key]
    # bool is an int in Python; `batch_size: true` is a mistake, not 1.
    wrong_bool = isinstance(value, bool) and bool not in types
    if wrong_bool or not isinstance(value, types) or not check(value):
        # dp is a mapping of its own: say which of its keys is wrong first.
        problem = _dp_problem(value) if key == "dp" and isinstance(value, dict) else None
        detail = f" ({problem})" if problem else ""
        raise InputError(path, f"must be {demand}, got {shorten(value)}{detail}", key=key)
    if key in UPPER_BOUNDS and value is not None:
        largest, why = UPPER_BOUNDS[key]
        if value > largest:
            raise InputError(path, f"must be at most {largest} ({why}), got {shorten(value)}", key=key)
