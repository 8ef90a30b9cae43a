"""One site's model, data and figures across a run: the local work the states call.

Plain PyTorch: the states decide who talks to whom; this class loads and checks the inputs,
trains a round, evaluates, and prepares, calibrates and converts the model to int8.
"""
import inspect
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

import quant
from federation.aggregate import WEIGHTS, control_variates, join, split
from federation.compress import compress, decompress
from inputs.config import CONFIG_FILE, load_config
from inputs.datasets import describe_dataset, load_dataset
from inputs.errors import InputError
from inputs.model_file import check_model_on_data, load_model
from inputs.train_function import call_train_function, load_train_function
from training import evaluate, make_loader, seed_everything, train
from training.scaffold import ControlVariates


@dataclass
class Site:
    input_dir: Path
    config: object
    model: torch.nn.Module
    train_loader: object
    test_loader: object
    train_info: object
    test_info: object
    train_function: object
    round: int = 0
    rounds: list = field(default_factory=list)             # this site's figures per round
    federation_rounds: list = field(default_factory=list)  # coordinator: federation-wide figures
    optimizer: torch.optim.Optimizer = None  # kept across rounds (keep_optimizer_state)
    device: str = "cpu"          # where training and float evaluation run (config `device`)
    global_tensors: dict = None  # the last global model received: what int8 deltas refer to
    control: dict = None         # SCAFFOLD: this site's control variate c_i (None: zeros)
    prepared: torch.nn.Module = None  # the model with observers (PTQ) or fake quantization (QAT)
    int8_model: torch.nn.Module = None
    float_model: torch.nn.Module = None  # set with the int8 model: what model_fp32.pt holds
    predictions: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=lambda: defaultdict(float))  # compute time by activity
    bytes_sent: dict = field(default_factory=dict)                     # payload bytes by memo

    @contextmanager
    def timed(self, activity):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[activity] += time.perf_counter() - started

    # ---- inputs -------------------------------------------------------------------------
    @classmethod
    def load(cls, input_dir):
        """Read and check everything this site was given; InputError names what is wrong."""
        input_dir = Path(input_dir)
        config = load_config(input_dir)
        seed_everything(config.seed)
        train_path, test_path = input_dir / config.train_dataset, input_dir / config.test_dataset
        train_set = load_dataset(train_path, "train_dataset")
        test_set = load_dataset(test_path, "test_dataset")
        train_info = describe_dataset(train_set, train_path, "train_dataset")
        test_info = describe_dataset(test_set, test_path, "test_dataset")
        if train_info.input_shape != test_info.input_shape:
            raise InputError(test_path, f"inputs have shape {test_info.input_shape}, the train "
                             f"set's have {train_info.input_shape}", key="test_dataset")
        model = load_model(input_dir / config.model, config.model_class, config.model_kwargs)
        train_loader = make_loader(train_set, config.batch_size, shuffle=True, seed=config.seed)
        test_loader = make_loader(test_set, config.batch_size, shuffle=False)
        n_classes = max(train_info.n_classes, test_info.n_classes)
        check_model_on_data(model, next(iter(train_loader))[0], n_classes, input_dir / config.model)
        train_function = train
        if config.train_function:
            train_function = load_train_function(input_dir / config.train_function)
            _check_fedprox_support(train_function, config, input_dir / config.train_function)
            _check_scaffold_support(train_function, config, input_dir / config.train_function)
        return cls(input_dir, config, model, train_loader, test_loader, train_info, test_info,
                   train_function, device=resolve_device(config.device, input_dir / CONFIG_FILE))

    @property
    def n_train(self):
        return self.train_info.n

    def summary(self):
        """What the coordinator needs to check that the sites fit together."""
        return {"n_train": self.train_info.n, "n_test": self.test_info.n,
                "input_shape": list(self.train_info.input_shape),
                "n_classes": max(self.train_info.n_classes, self.test_info.n_classes)}

    @property
    def example_inputs(self):
        return (next(iter(self.test_loader))[0][:1],)

    # ---- federated training -------------------------------------------------------------
    @property
    def is_qat(self):
        return self.config.quant_type == "qat"

    @property
    def trained_model(self):
        """The model the rounds train: the float model, or its fake-quantized version (QAT)."""
        return self.prepared if self.prepared is not None else self.model

    def start_round(self):
        """Advance to the next round; switch to / freeze QAT as the schedule says."""
        self.round += 1
        if self.is_qat:
            first, freeze_bn, freeze_observers = self.config.qat_schedule()
            if self.round == first:
                self.prepared = quant.prepare_qat(self.model, self.example_inputs, self.config.backend)
                self.optimizer = None  # the QAT model has new parameter objects
            if self.round >= first:
                quant.freeze_qat(self.prepared, observers=self.round >= freeze_observers,
                                 batchnorm=self.round >= freeze_bn)
        return self.round

    def update_tensors(self):
        """What this site contributes to averaging: weights (+ observer statistics under QAT,
        + its control variate c_i under SCAFFOLD: averaged, they are the next global's c)."""
        observer_stats = quant.observer_stats(self.prepared) if self.prepared is not None else {}
        controls = self.local_control() if self.uses_scaffold else None
        return join(quant.float_state(self.trained_model), observer_stats, controls)

    @property
    def uses_scaffold(self):
        return self.config.aggregation == "scaffold"

    def local_control(self):
        """SCAFFOLD's c_i by parameter name: zeros until the first round has trained."""
        if self.control is None:
            return {name: torch.zeros(parameter.shape)
                    for name, parameter in self.trained_model.named_parameters()}
        return self.control

    def parameter_names(self):
        """The update entries that are trainable parameters (what a server optimizer steps)."""
        return {WEIGHTS + name for name, _ in self.trained_model.named_parameters()}

    # With `communication: int8` messages carry int8 deltas to `global_tensors` (compress.py);
    # a float message passes through `decompress` unchanged.
    def update_message(self):
        """This round's update as it travels to the coordinator."""
        return self._outgoing(self.update_tensors())

    def global_message(self, next_global):
        """Coordinator: the next global model as it travels to every site."""
        return self._outgoing(next_global)

    def read_message(self, message, sender):
        """A received update (coordinator) or global model back as full tensors."""
        return decompress(message, self.global_tensors, sender)

    def _outgoing(self, tensors):
        if self.config.communication == "int8" and self.global_tensors is not None:
            return compress(tensors, self.global_tensors)
        return tensors

    def load_global(self, tensors):
        """Load the global model (read_message's output); it is what the next deltas refer to."""
        self.global_tensors = tensors
        weights, observer_stats = split(tensors)
        quant.load_float_state(self.trained_model, weights)
        if observer_stats:
            quant.load_observer_stats(self.prepared, observer_stats)

    @contextmanager
    def on_device(self):
        """Training and float evaluation run on `device`; in between the model stays on the
        CPU, where payloads, averaging and quantization work. (Moving keeps the parameter
        objects, so the kept optimizer's references stay valid.)"""
        self.trained_model.to(self.device)
        try:
            yield self.device
        finally:
            self.trained_model.to("cpu")

    def train_round(self):
        """Train the global model on this site's data; return loss/accuracy on the train set."""
        # SCAFFOLD: the correction c - c_i (c came with the global model); it records the
        # round's gradients, whose mean is this site's next c_i.
        control = ControlVariates(control_variates(self.global_tensors), self.local_control()) \
            if self.uses_scaffold else None
        with self.timed("train"), self.on_device() as device:
            call_train_function(self.train_function, self.trained_model, self.train_loader,
                                self.config.epochs, self.config.learning_rate,
                                optimizer=self.round_optimizer(), device=device,
                                **self._fedprox_arguments(), **({"control": control} if control else {}))
        if control is not None:
            self.control = control.updated_local(
                {name: parameter.shape for name, parameter in self.trained_model.named_parameters()})
        # Measured the same way for the app's own loop and for custom train functions.
        with self.timed("evaluate"), self.on_device() as device:
            result = evaluate(self.trained_model, self.train_loader, device=device)
        row = {"round": self.round, "train_loss": result.loss, "train_accuracy": result.accuracy,
               "test_loss": None, "test_accuracy": None}
        self.rounds.append(row)
        return {"train_loss": result.loss, "train_accuracy": result.accuracy}

    def round_optimizer(self):
        """Adam for this round: the site's kept one (global weights are loaded in place, so
        its references stay valid), or None for a fresh one per round."""
        if not self.config.keep_optimizer_state:
            return None
        if self.optimizer is None:
            self.optimizer = torch.optim.Adam(self.trained_model.parameters(), lr=self.config.learning_rate)
        return self.optimizer

    def _fedprox_arguments(self):
        """FedProx's keywords: the round's global parameters (loaded just before training)."""
        if self.config.mu == 0:
            return {}
        return {"mu": self.config.mu,
                "global_weights": {name: parameter.detach().clone()
                                   for name, parameter in self.trained_model.named_parameters()}}

    def evaluate_global(self):
        """Evaluate the just-received global model on this site's test set."""
        with self.timed("evaluate"), self.on_device() as device:
            result = evaluate(self.trained_model, self.test_loader, device=device)
        self.rounds[-1].update(test_loss=result.loss, test_accuracy=result.accuracy)
        return {"test_loss": result.loss, "test_accuracy": result.accuracy,
                "n_test": self.test_info.n}

    # ---- quantization -------------------------------------------------------------------
    def calibration_stats(self):
        """post_static: observers run on this site's train data; QAT: observers already merged."""
        if self.is_qat:
            return {}
        with self.timed("quantize"):
            self.prepared = quant.prepare_ptq(self.model, self.example_inputs, self.config.backend)
            batches = (inputs for inputs, _ in self.train_loader)
            quant.calibrate(self.prepared, batches, self.config.calibration_batches)
            return quant.observer_stats(self.prepared)

    @staticmethod
    def merge_calibration(stats_per_site):
        return quant.merge_observer_stats(stats_per_site) if stats_per_site[0] else {}

    def convert(self, merged_stats):
        """Convert to int8 with the federation's quantization parameters."""
        with self.timed("quantize"):
            if merged_stats:
                quant.load_observer_stats(self.prepared, merged_stats)
            quant.set_engine(self.config.backend)
            self.int8_model = quant.convert(self.prepared)
        # The final float model in the user's class (QAT: its trained float weights).
        self.float_model = quant.to_float_model(self.prepared, self.model) if self.is_qat else self.model
        return self.int8_model

    def final_results(self):
        """fp32 vs int8 on this site's test set: accuracy, loss, size, latency."""
        batch = next(iter(self.test_loader))[0]
        figures = {"n_train": self.train_info.n, "n_test": self.test_info.n,
                   "seconds": dict(self.seconds)}
        for precision, model in (("fp32", self.float_model), ("int8", self.int8_model)):
            result = evaluate(model, self.test_loader)
            self.predictions[precision] = result.y_pred
            self.predictions["true"] = result.y_true
            figures[precision] = {"accuracy": result.accuracy, "loss": result.loss,
                                  "size_bytes": quant.state_dict_size_bytes(model),
                                  "latency_ms": quant.latency_ms(model, batch)}
        return figures


def resolve_device(device, config_path):
    """"auto": the GPU when PyTorch sees one, else the CPU; "cuda" without a GPU is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError(config_path, "is cuda, but PyTorch sees no GPU on this machine "
                         "(use auto or cpu)", key="device")
    return device


def _check_scaffold_support(train_function, config, path):
    """aggregation: scaffold with a train function that cannot take `control=` would train
    without the correction while the federation believes it is corrected."""
    if config.aggregation != "scaffold":
        return
    try:
        inspect.signature(train_function).bind_partial(control=None)
    except TypeError:
        raise InputError(path, "config sets aggregation: scaffold, but train() accepts no "
                         "control= keyword (see training/loop.py)", key="train_function") from None
    except ValueError:
        pass  # no readable signature: trust it


def _check_fedprox_support(train_function, config, path):
    """mu > 0 with a train function that cannot take it would silently train without FedProx."""
    if config.mu == 0:
        return
    try:
        inspect.signature(train_function).bind_partial(mu=config.mu, global_weights={})
    except TypeError:
        raise InputError(path, f"config sets mu: {config.mu} (FedProx), but train() accepts no "
                         "mu= and global_weights= keywords (see training/loop.py)",
                         key="train_function") from None
    except ValueError:
        pass  # no readable signature: trust it
