"""One site's side of the federation: what it sends and what it does with what it receives.

The work itself lives elsewhere: the inputs in `inputs.SiteInputs`, training in
`training.LocalTraining`, the way to int8 in `quant.Int8Recipe`, the wire in
`federation.messages.Codec`. Every method that talks to the federation takes or returns the
bytes of one message; the states move those bytes.
"""
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import quant
from federation.aggregate import weighted_average
from federation.checks import PeerMessageError, SiteMismatchError
from federation.messages import Codec, ModelMessage, round_memo
from federation.selection import Decision
from inputs.site_inputs import SiteInputs, load_site_inputs
from outputs.atomic import copy_file
from training import evaluate
from training.label_shift import logit_offset
from training.local import LocalTraining
from training.privacy import DPSettings


@dataclass
class Site:
    inputs: SiteInputs
    local: LocalTraining
    recipe: quant.Int8Recipe
    codec: Codec
    round: int = 0
    rounds: list = field(default_factory=list)  # this site's figures per round
    server_control: dict = field(default_factory=dict)  # SCAFFOLD's c, from the last global
    own_stats: dict = None                      # this site's calibration statistics
    results: dict = None                        # fp32 vs int8 on this site's test set
    artifacts: list = None                      # the int8 files, each measured in its own runtime
    predictions: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=lambda: defaultdict(float))  # compute time by activity
    bytes_sent: dict = field(default_factory=dict)                     # payload bytes by memo
    dp_report: dict = None                      # DP-SGD: budget, noise, epsilon spent
    latest_global: ModelMessage = None          # the global model loaded last
    evaluated_global: ModelMessage = None       # the round's model: latest_global, or its moving average (model_ema)
    kept_global: ModelMessage = None            # a copy of the kept round's model, unless it is the one loaded now
    decision: Decision = None                   # the coordinator's last `round_<r>` decision

    @classmethod
    def load(cls, input_dir):
        """Read and check everything this site was given; InputError names what is wrong."""
        inputs = load_site_inputs(input_dir)
        config = inputs.config
        local = LocalTraining(inputs.model, inputs.train_loader, inputs.train_function, config.epochs,
                              config.learning_rate, inputs.device, config.keep_optimizer_state,
                              config.mu, scaffold=config.aggregation == "scaffold",
                              dp=DPSettings.from_config(config.dp), total_epochs=config.max_iter * config.epochs)
        recipe = quant.Int8Recipe(config.quant_type, config.backend, inputs.example_inputs,
                                  config.qat_schedule(), inputs.float_layers)
        site = cls(inputs, local, recipe, Codec(config.communication))
        site.codec.expect(site.local_message())
        return site

    @property
    def config(self):
        return self.inputs.config

    @contextmanager
    def timed(self, activity):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[activity] += time.perf_counter() - started

    def record_bytes(self, memo, size):
        """Payload bytes sent under `memo` (a round's step messages add up under the round)."""
        memo = round_memo(memo)
        self.bytes_sent[memo] = self.bytes_sent.get(memo, 0) + size

    def summary_message(self):
        """Shapes and counts (with logit_adjustment also the training label counts, which the
        coordinator sums; under secure aggregation only the sum travels: federation.secure)."""
        summary = self.inputs.summary()
        if self.config.logit_adjustment > 0:
            summary["label_counts"] = self.inputs.label_counts()
        return self.codec.encode_report(summary)

    # ---- federated training -------------------------------------------------------------
    def local_message(self, **meta):
        """This site's model as it is averaged: weights (+ QAT's observer statistics, + its
        control variate c_i under SCAFFOLD: averaged, they are the next global's c)."""
        controls = self.local.local_control() if self.local.scaffold else {}
        return ModelMessage(quant.float_state(self.local.model), self.recipe.observer_stats(), controls, meta)

    def parameter_names(self):
        """The weights that are trainable parameters (what an aggregation rule steps)."""
        return self.local.parameter_names()

    def start_round(self):
        """Advance to the next round; QAT starts or freezes as the schedule says."""
        self.round += 1
        model = self.recipe.model_for_round(self.round, self.local.model)
        if model is not self.local.model:
            self.local.replace_model(model)
            self.evaluated_global = None  # model_ema's average restarts with the new model
        self.local.set_learning_rate(self.config.round_learning_rate(self.round))
        return self.round

    def train_round(self):
        """Train the global model on this site's data; the update message, with the model's
        loss and accuracy on the train set (measured the same way for any train function)."""
        return self.codec.encode_model(self.train_round_message())

    def train_round_message(self):
        """`train_round`'s update as a ModelMessage (secure aggregation sends it as a sum)."""
        with self.timed("train"):
            self.local.train_round(self.server_control)
        with self.timed("evaluate"):
            result = self.local.evaluate(self.inputs.train_loader)
        self.rounds.append({"round": self.round, "train_loss": result.loss, "train_accuracy": result.accuracy,
                            "test_loss": None, "test_accuracy": None,
                            "validation_loss": None, "validation_accuracy": None})
        update = self.local_message(n_train=self.inputs.train_info.n, train_loss=result.loss,
                                    train_accuracy=result.accuracy)
        # What every model message must look like from now on (QAT's per-channel ranges take
        # their shape when they first see data, i.e. in the first QAT round's training).
        self.codec.expect(update)
        return update

    def receive_global(self, sender, data):
        """Load the coordinator's global model; return its metadata."""
        message = self.codec.decode_global(sender, data)
        if self.round == 0 and self.config.logit_adjustment > 0:
            self.start_logit_adjustment(sender, message.meta.get("label_counts"))
        self.load_global(message)
        self.server_control = message.controls
        return message.meta

    def start_logit_adjustment(self, sender, federation_counts):
        """Train from now on with the offset of this site's label prior against the
        federation's (training.label_shift), from the counts the coordinator sent (their
        range is checked with the message: federation.checks, `global`)."""
        own = self.inputs.label_counts()
        if federation_counts is None or len(federation_counts) != len(own) or sum(federation_counts) == 0:
            shown = "none" if federation_counts is None else f"{len(federation_counts)} counts adding up to {sum(federation_counts)}"
            raise PeerMessageError(
                f"the first global model from {sender} carries label counts ({shown}) that cannot be the "
                f"federation's: expected {len(own)} counts (one per class score of the model), not all zero",
                sender, "bad label counts")
        self.local.logit_offset = logit_offset(own, federation_counts, self.config.logit_adjustment)

    def load_global(self, message):
        quant.load_float_state(self.local.model, message.weights)
        self.recipe.load_observer_stats(message.observers)
        self.latest_global = message

    def evaluate_global(self):
        """The test-figures message of the just-received global model."""
        return self.codec.encode_report(self.evaluate_global_figures())

    def evaluate_global_figures(self):
        """The round's evaluated model (the global model, or with model_ema its moving
        average) on this site's test set and on its validation split (null figures and
        n_validation 0 without one)."""
        self.evaluated_global = self.round_model()
        with self.timed("evaluate"), self.weights_loaded(self.evaluated_global):
            result = self.local.evaluate(self.inputs.test_loader)
            validation = self.local.evaluate(self.inputs.validation_loader) if self.inputs.validation_loader else None
        figures = {"test_loss": result.loss, "test_accuracy": result.accuracy,
                   "validation_loss": validation.loss if validation else None,
                   "validation_accuracy": validation.accuracy if validation else None}
        self.rounds[-1].update(figures)
        return {**figures, "n_test": self.inputs.test_info.n,
                "n_validation": self.inputs.validation_info.n if validation else 0}

    def round_model(self):
        """The model this round's figures measure, `keep` selects from and the site may write:
        the global model just received, or with model_ema d the moving average d * (the last
        round's) + (1 - d) * (the global model). Training goes on from the global model itself.
        Every site received the same broadcasts, so every site holds the same average; it
        restarts when the model is replaced (QAT's first round, start_round)."""
        decay, before, latest = self.config.model_ema, self.evaluated_global, self.latest_global
        if not decay:
            return latest
        if before is None:
            return _copy_of(latest)
        weights = weighted_average([before.weights, latest.weights], [decay, 1 - decay])
        return ModelMessage(weights, dict(latest.observers), dict(latest.controls), dict(latest.meta))

    @contextmanager
    def weights_loaded(self, message):
        """`message`'s weights in the model for the duration (the global model's back after)."""
        if message is self.latest_global:
            yield
            return
        quant.load_float_state(self.local.model, message.weights)
        try:
            yield
        finally:
            quant.load_float_state(self.local.model, self.latest_global.weights)

    def follow_decision(self, sender, data):
        """The coordinator's `round_<r>` decision: keep a copy of this round's model when it is
        the kept one and more rounds may follow (or it is not the global model loaded now, as
        with model_ema); return whether training stops now."""
        meta = self.codec.decode_report(sender, data, "decision")
        decision = Decision(**meta)
        if decision.round != self.round or decision.kept_round > self.round:
            raise SiteMismatchError(f"site {sender}'s decision for round {decision.round} keeps round "
                                    f"{decision.kept_round}, but this site is in round {self.round}",
                                    sender, "bad decision")
        self.decision = decision
        if decision.kept_round == self.round:  # no copy for the global model loaded now when no round follows
            last_and_loaded = self.training_done and self.evaluated_global is self.latest_global
            self.kept_global = None if last_and_loaded else _copy_of(self.evaluated_global)
        return decision.stop

    @property
    def training_done(self):
        return self.round >= self.config.max_iter or (self.decision is not None and self.decision.stop)

    def restore_kept_global(self):
        """Before calibration: the kept round's model (global, or its moving average) in place
        of the latest global (the same at every site: every site loaded the same broadcasts)."""
        if self.kept_global is not None:
            self.load_global(self.kept_global)
        self.kept_global = None

    # ---- quantization -------------------------------------------------------------------
    def calibration_message(self):
        """post_static: observer statistics of this site's train data; QAT: none."""
        self.finish_training()
        with self.timed("quantize"):
            batches = (inputs for inputs, _ in self.inputs.train_loader)
            self.own_stats = self.recipe.calibrate(self.inputs.model, batches, self.config.calibration_batches)
        return self.codec.encode_stats(self.own_stats)

    def finish_training(self):
        """After the last round: DP-SGD's hooks removed, its budget report kept, the kept
        round's global model restored (keep: best)."""
        if self.dp_report is None:
            self.dp_report = self.local.finish_private_training()
        self.restore_kept_global()

    def convert(self, sender, data):
        """Convert to int8 with the federation's statistics (the coordinator's `qparams`)."""
        merged = self.codec.decode_stats(sender, data, self.own_stats)
        with self.timed("quantize"):
            self.recipe.convert(merged, self.inputs.model)

    def export_int8(self, output_dir):
        """Write the int8 model's files (model_int8.pt for the FX backends; .pte, .onnx and .pt2
        for xnnpack) and measure each in its own runtime on this site's test set."""
        # Written and measured aside, then each published whole or not at all (outputs.atomic).
        # In the measurement slot: sites sharing a machine (the testbed) do this one at a time,
        # so one site's latencies are not taken while another one computes.
        with quant.measurement_slot(), self.timed("export"), tempfile.TemporaryDirectory() as staging:
            paths = quant.write_artifacts(self.recipe.int8_model, self.inputs.example_inputs, staging,
                                          self.config.backend)
            self.artifacts = [{"file": path.name, **quant.measure_artifact(
                path, self.inputs.test_loader, (1, self.config.batch_size), backend=self.config.backend)}
                for path in paths.values()]
            for path in paths.values():
                copy_file(path, Path(output_dir) / path.name)

    def results_message(self):
        """fp32 vs int8 on this site's test set: accuracy, loss, size, latency; and the int8 files."""
        return self.codec.encode_report(self.measure_results())

    def measure_results(self):
        with quant.measurement_slot():  # one site at a time where sites share a machine: see export_int8
            return self._measure_results()

    def _measure_results(self):
        batch = next(iter(self.inputs.test_loader))[0]
        validation = self.inputs.validation_info
        self.results = {"n_train": self.inputs.train_info.n, "n_test": self.inputs.test_info.n,
                        "n_validation": validation.n if validation else 0,
                        "seconds": dict(self.seconds), "artifacts": self.artifacts}
        for precision, model in (("fp32", self.recipe.float_model), ("int8", self.recipe.int8_model)):
            result = evaluate(model, self.inputs.test_loader)
            self.predictions[precision] = result.y_pred
            self.results[precision] = {"accuracy": result.accuracy, "loss": result.loss,
                                       "size_bytes": quant.state_dict_size_bytes(model),
                                       "latency_ms": quant.latency_ms(model, batch)}
        self.predictions["true"] = result.y_true
        return self.results


def _copy_of(message):
    """A ModelMessage whose tensors are copies (training changes the model's in place)."""
    def copied(tensors):
        return {name: tensor.detach().clone() for name, tensor in tensors.items()}
    return ModelMessage(copied(message.weights), copied(message.observers), copied(message.controls),
                        dict(message.meta))
