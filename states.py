"""The app's state machine. Each state is short: it moves messages and calls the local work.

initial -> local_train -> aggregate -> (local_train | quantize) -> write_results -> terminal

Every state runs at every site; inside `aggregate`, `quantize` and `write_results` only the
coordinator gathers and broadcasts. Messages are `federation.payload` bytes (safetensors +
JSON metadata; never pickle); ARCHITECTURE.md lists them.
"""
import os

from FeatureCloud.app.engine.app import AppState, Role, State, app_state

from federation import engine, payload
from federation.aggregate import check_update, federated_average
from federation.server_optimizer import ServerOptimizer
from federation.site import Site
from federation.summary import check_report, check_sites_fit, federation_results, federation_round
from outputs.results import write_results
from webui import live_status

INPUT_DIR = os.environ.get("FC_INPUT_DIR", "/mnt/input")
OUTPUT_DIR = os.environ.get("FC_OUTPUT_DIR", "/mnt/output")


class FederatedState(AppState):
    """Plumbing every state shares: this site's work object, messages, progress."""

    @property
    def site(self) -> Site:
        return self.load("site")

    def send_to_coordinator(self, memo, tensors=None, **meta):
        data = payload.encode(tensors or {}, meta)
        self.site.bytes_sent[memo] = len(data)
        self.send_data_to_coordinator(data, memo=memo)

    def broadcast(self, memo, tensors=None, **meta):
        data = payload.encode(tensors or {}, meta)
        self.site.bytes_sent[memo] = len(data)
        self.broadcast_data(data, memo=memo)

    def gather(self, memo, kind=None):
        """Coordinator: [(sender, tensors, meta)] from every site, in client order; with `kind`,
        each site's metadata is checked to be that kind of report."""
        received = engine.receive(self, memo, n=len(self.clients))
        decoded = [(piece.sender, *payload.decode(piece.data, piece.sender)) for piece in received]
        if kind:
            for sender, _, meta in decoded:
                check_report(kind, meta, sender)
        return decoded

    def await_broadcast(self, memo):
        """(tensors, meta) of the coordinator's broadcast under `memo`."""
        (piece,) = engine.receive(self, memo, n=1)
        return payload.decode(piece.data, piece.sender)

    def receive_global(self, memo):
        """Load the coordinator's global model, once it is checked against the local one."""
        (piece,) = engine.receive(self, memo, n=1)
        message, meta = payload.decode(piece.data, piece.sender)
        tensors = self.site.read_message(message, piece.sender)  # int8 deltas -> full tensors
        check_update(self.site.update_tensors(), tensors, piece.sender)
        self.site.load_global(tensors)
        if isinstance(meta.get("federation_accuracy"), float):
            live_status.update(federation_accuracy=meta["federation_accuracy"])

    def show(self, message, progress):
        self.update(message=message[:40], progress=progress, state=State.RUNNING)
        live_status.update(state=self.name, message=message)

    def round_progress(self, round_number):
        return 0.05 + 0.8 * round_number / self.site.config.max_iter


@app_state("initial", Role.BOTH)
class Initial(FederatedState):
    def register(self):
        self.register_transition("local_train", Role.BOTH, label="inputs valid")

    def run(self):
        live_status.update(site_id=self.id, coordinator=self.is_coordinator, state=self.name)
        self.show("checking inputs", 0.01)
        site = Site.load(INPUT_DIR)
        self.store("site", site)
        live_status.update(max_iter=site.config.max_iter, round=0)
        self.send_to_coordinator("summary", **site.summary())
        if self.is_coordinator:
            check_sites_fit([(sender, meta) for sender, _, meta in self.gather("summary", "summary")])
            self.broadcast("global_0", site.update_tensors())
        self.receive_global("global_0")
        return "local_train"


@app_state("local_train", Role.BOTH)
class LocalTrain(FederatedState):
    def register(self):
        self.register_transition("aggregate", Role.BOTH, label="update sent")

    def run(self):
        site = self.site
        round_number = site.start_round()
        self.show(f"round {round_number}/{site.config.max_iter}: training",
                  self.round_progress(round_number - 1))
        live_status.update(round=round_number)
        train_metrics = site.train_round()
        self.send_to_coordinator(f"update_{round_number}", site.update_message(),
                                 n_train=site.n_train, **train_metrics)
        return "aggregate"


@app_state("aggregate", Role.BOTH)
class Aggregate(FederatedState):
    def register(self):
        self.register_transition("local_train", Role.BOTH, label="next round")
        self.register_transition("quantize", Role.BOTH, label="rounds done")

    def run(self):
        site, round_number = self.site, self.site.round
        if self.is_coordinator:
            self.show(f"round {round_number}: averaging", self.round_progress(round_number))
            # With the latest federation-wide accuracy, for the participants' status pages.
            latest = site.federation_rounds[-1]["test_accuracy"] if site.federation_rounds else None
            self.broadcast(f"global_{round_number}", self.average_updates(round_number),
                           federation_accuracy=latest)
        self.receive_global(f"global_{round_number}")
        test_metrics = site.evaluate_global()
        live_status.update(site_accuracy=test_metrics["test_accuracy"])
        self.send_to_coordinator(f"test_{round_number}", **test_metrics)
        if self.is_coordinator:
            self.record_federation_round(round_number)
        return "local_train" if round_number < site.config.max_iter else "quantize"

    def average_updates(self, round_number):
        """Coordinator: average the sites' updates, let the server optimizer step from the
        previous global, and return the next global as it travels (int8 deltas or float)."""
        site = self.site
        reference = site.update_tensors()
        updates = [(sender, site.read_message(message, sender), meta)
                   for sender, message, meta in self.gather(f"update_{round_number}", "update")]
        for sender, tensors, _ in updates:
            check_update(reference, tensors, sender)
        self.store("updates_meta", [meta for *_, meta in updates])
        averaged = federated_average([tensors for _, tensors, _ in updates],
                                     [meta["n_train"] for *_, meta in updates])
        next_global = self.server_optimizer.step(site.global_tensors, averaged, site.parameter_names())
        return site.global_message(next_global)

    @property
    def server_optimizer(self):
        """The coordinator's ServerOptimizer; its momentum / moments live across rounds."""
        if self.load("server_optimizer") is None:
            self.store("server_optimizer", ServerOptimizer.from_config(self.site.config))
        return self.load("server_optimizer")

    def record_federation_round(self, round_number):
        tests = [meta for *_, meta in self.gather(f"test_{round_number}", "test")]
        row = federation_round(round_number, self.load("updates_meta"), tests)
        self.site.federation_rounds.append(row)
        self.log(f"federation round {round_number}: train loss {row['train_loss']:.4f} "
                 f"acc {row['train_accuracy']:.4f} | test loss {row['test_loss']:.4f} "
                 f"acc {row['test_accuracy']:.4f}")
        live_status.update(federation_accuracy=row["test_accuracy"])


@app_state("quantize", Role.BOTH)
class Quantize(FederatedState):
    def register(self):
        self.register_transition("write_results", Role.BOTH, label="int8 model ready")

    def run(self):
        site = self.site
        self.show("calibrating observers", 0.86)
        own_stats = site.calibration_stats()
        self.send_to_coordinator("calibration", own_stats)
        if self.is_coordinator:
            reports = self.gather("calibration")
            for sender, stats, _ in reports:
                check_update(own_stats, stats, sender, allow_infinite=True)
            self.broadcast("qparams", site.merge_calibration([stats for _, stats, _ in reports]))
        merged_stats, _ = self.await_broadcast("qparams")
        check_update(own_stats, merged_stats, self.coordintor_id, allow_infinite=True)
        self.show("converting to int8", 0.9)
        site.convert(merged_stats)
        return "write_results"


@app_state("write_results", Role.BOTH)
class WriteResults(FederatedState):
    def register(self):
        self.register_transition("terminal", Role.BOTH, label="outputs written")

    def run(self):
        site = self.site
        self.show("measuring fp32 vs int8", 0.93)
        results = site.final_results()
        self.send_to_coordinator("results", **results)
        if self.is_coordinator:
            reports = [meta for *_, meta in self.gather("results", "results")]
            self.broadcast("final", rounds=site.federation_rounds,
                           figures=federation_results(reports))
        _, federation = self.await_broadcast("final")
        metrics = write_results(OUTPUT_DIR, site, results, federation,
                                site_info={"id": self.id, "coordinator": self.is_coordinator})
        live_status.update(finished=True, results={
            "site": {"fp32": metrics["fp32"], "int8": metrics["int8"]},
            "federation": metrics["federation"]})
        self.show("done", 1.0)
        return "terminal"
