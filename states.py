"""The app's state machine. Each state moves messages; the Site and the coordinator do the work.

initial -> local_train -> aggregate -> (local_train | quantize) -> write_results -> terminal

`aggregate` ends with the coordinator's `round_<r>` decision (federation.selection): the round
whose global model is kept so far, and whether training stops before max_iter (patience).

Every state runs at every site; inside `aggregate`, `quantize` and `write_results` only the
coordinator gathers and broadcasts. Messages are bytes made and read by
`federation.messages.Codec` (safetensors + JSON metadata; never pickle); ARCHITECTURE.md lists them.
How they travel, whole or as secure sums, is the channel's business (federation/channel.py).
"""
import os

from FeatureCloud.app.engine.app import AppState, Role, State, app_state

from federation import engine
from federation.channel import PlainChannel, SecureChannel, open_channel
from federation.selection import selection_report
from federation.site import Site
from outputs.results import build_metrics, privacy_report, write_results
from webui import live_status

INPUT_DIR = os.environ.get("FC_INPUT_DIR", "/mnt/input")
OUTPUT_DIR = os.environ.get("FC_OUTPUT_DIR", "/mnt/output")


class FederatedState(AppState):
    """Plumbing every state shares: this site, its channel, messages, progress."""

    @property
    def site(self) -> Site:
        return self.load("site")

    @property
    def channel(self) -> PlainChannel | SecureChannel:
        return self.load("channel")

    @property
    def aggregator(self):
        """The coordinator's work, as the channel reads it (`self.coordinator` is the engine's flag)."""
        return self.channel.aggregator

    def send(self, memo):
        """This site's message under `memo`, whole or as its share of a secure sum."""
        self.channel.send(self, memo)

    def gather(self, memo):
        """Coordinator: what arrived under `memo`, in the form the aggregator takes."""
        return self.channel.gather(self, memo)

    # ---- the transport the channel uses: the engine's send and receive calls ----
    def send_to_coordinator(self, memo, data):
        self.site.record_bytes(memo, len(data))
        self.send_data_to_coordinator(data, memo=memo)

    def send_sum(self, memo, vector, exponent):
        """A share of a secure sum: JSON numbers, fixed point with `exponent` decimals; the
        controller hands the coordinator only the sum."""
        self.configure_smpc(exponent=exponent)
        self.send_data_to_coordinator(vector, memo=memo, use_smpc=True)

    def broadcast(self, memo, data):
        self.site.record_bytes(memo, len(data))
        self.broadcast_data(data, memo=memo)

    def gather_pieces(self, memo):
        """Coordinator: [(sender, bytes)] from every site, in client order."""
        return [(piece.sender, piece.data) for piece in engine.receive(self, memo, n=len(self.clients))]

    def gather_sum(self, memo):
        """Coordinator: the controller's one aggregate under `memo` (JSON bytes)."""
        (piece,) = engine.receive(self, memo, n=1)
        return piece.data

    def await_broadcast(self, memo):
        """(sender, bytes) of the coordinator's broadcast under `memo`."""
        (piece,) = engine.receive(self, memo, n=1)
        return piece.sender, piece.data

    def receive_global(self, memo):
        meta = self.site.receive_global(*self.await_broadcast(memo))
        if isinstance(meta.get("federation_accuracy"), float):
            live_status.update(federation_accuracy=meta["federation_accuracy"])
        return meta

    def show(self, message, progress):
        self.update(message=message[:40], progress=progress, state=State.RUNNING)
        live_status.update(state=self.name, message=message)

    def next_state(self, round_number):
        """After a round: the coordinator's decision (the kept round so far, stop early?)."""
        self.site.follow_decision(*self.await_broadcast(f"round_{round_number}"))
        return "quantize" if self.site.training_done else "local_train"

    def round_progress(self, round_number):
        return 0.05 + 0.8 * round_number / self.site.config.max_iter


@app_state("initial", Role.BOTH)
class Initial(FederatedState):
    def register(self):
        self.register_transition("local_train", Role.BOTH, label="inputs valid")

    def run(self):
        live_status.update(site_id=self.id, coordinator=self.is_coordinator, state=self.name)
        self.show("checking inputs", 0.01)
        site = Site.load(INPUT_DIR)  # under the state's watchdog, like every state's work
        self.store("site", site)
        engine.set_watchdog_seconds(site.config.watchdog_seconds)
        # No message is larger than a model update (weights + SCAFFOLD's controls + ranges).
        engine.limit_payload_bytes(engine.payload_limit_for(site.local_message().joined(), factor=3))
        live_status.update(max_iter=site.config.max_iter, round=0)
        self.store("channel", open_channel(site, len(self.clients), self.is_coordinator))
        self.send("summary")
        if self.is_coordinator:
            self.aggregator.check_summaries(self.gather("summary"))
            self.broadcast("global_0", self.channel.first_global(self))
        self.channel.receive_first_global(self.receive_global("global_0"))
        return "local_train"


@app_state("local_train", Role.BOTH)
class LocalTrain(FederatedState):
    def register(self):
        self.register_transition("aggregate", Role.BOTH, label="update sent")

    def run(self):
        round_number = self.site.start_round()
        self.show(f"round {round_number}/{self.site.config.max_iter}: training",
                  self.round_progress(round_number - 1))
        live_status.update(round=round_number)
        self.send(f"update_{round_number}")
        return "aggregate"


@app_state("aggregate", Role.BOTH)
class Aggregate(FederatedState):
    def register(self):
        self.register_transition("local_train", Role.BOTH, label="next round")
        self.register_transition("quantize", Role.BOTH, label="rounds done")

    def run(self):
        round_number = self.site.round
        if self.is_coordinator:
            self.show(f"round {round_number}: averaging", self.round_progress(round_number))
            self.broadcast(f"global_{round_number}", self.aggregator.aggregate(self.gather(f"update_{round_number}")))
        self.receive_global(f"global_{round_number}")
        self.send(f"test_{round_number}")
        live_status.update(site_accuracy=self.site.rounds[-1]["test_accuracy"])
        if self.is_coordinator:
            self.record_round(round_number)
            self.broadcast(f"round_{round_number}", self.aggregator.decide())
        return self.next_state(round_number)

    def record_round(self, round_number):
        """Coordinator: the federation's figures of this round, from the sites' test figures."""
        row = self.aggregator.record_round(round_number, self.gather(f"test_{round_number}"))
        self.log(f"federation round {round_number}{self.channel.log_suffix}: train loss {row['train_loss']:.4f} "
                 f"acc {row['train_accuracy']:.4f} | test loss {row['test_loss']:.4f} "
                 f"acc {row['test_accuracy']:.4f}")
        live_status.update(federation_accuracy=row["test_accuracy"])


@app_state("quantize", Role.BOTH)
class Quantize(FederatedState):
    def register(self):
        self.register_transition("write_results", Role.BOTH, label="int8 model ready")

    def run(self):
        self.show("calibrating observers", 0.86)
        self.send("calibration")
        if self.is_coordinator:
            self.broadcast("qparams", self.aggregator.merge_calibration(self.gather("calibration"),
                                                                          self.site.own_stats))
        self.show("converting to int8", 0.9)
        self.site.convert(*self.await_broadcast("qparams"))
        return "write_results"


@app_state("write_results", Role.BOTH)
class WriteResults(FederatedState):
    def register(self):
        self.register_transition("terminal", Role.BOTH, label="outputs written")

    def run(self):
        self.show("writing the int8 files", 0.91)
        self.site.export_int8(OUTPUT_DIR)
        self.show("measuring fp32 vs int8", 0.93)
        self.send("results")
        if self.is_coordinator:
            self.broadcast("final", self.aggregator.final(self.gather("results")))
        site, federation = self.site, self.site.codec.decode_report(*self.await_broadcast("final"), "final")
        metrics = build_metrics({"id": self.id, "coordinator": self.is_coordinator}, site.config,
                                site.recipe.mode, site.rounds, site.bytes_sent, site.results, federation,
                                privacy=privacy_report(site, self.channel.secure),
                                selection=selection_report(site.decision, site.config.max_iter, site.config.model_ema),
                                aggregation=site.inputs.aggregation_choice, float_layers=site.recipe.float_layers,
                                logit_adjustment=site.inputs.logit_adjustment_choice,
                                model_ema=site.inputs.model_ema_choice)
        write_results(OUTPUT_DIR, site.inputs.config_file, site.recipe.float_model, metrics, site.predictions)
        live_status.update(finished=True, results={
            "site": {"fp32": metrics["fp32"], "int8": metrics["int8"]},
            "federation": metrics["federation"]})
        self.show("done", 1.0)
        return "terminal"
