"""One site's local training across rounds: the model it trains, its optimizer, FedProx and
SCAFFOLD's correction. Plain PyTorch: the federation hands it weights and control variates."""
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from inputs.train_function import call_train_function
from training.epochs import RoundBatches
from training.loop import evaluate, make_optimizer
from training.privacy import DistributedDPSGD, DPSettings, PrivateTraining, dp_optimizer
from training.scaffold import ControlVariates


@dataclass
class LocalTraining:
    model: torch.nn.Module       # what the rounds train: the float model, or its QAT version
    train_loader: object
    train_function: object       # the user's train() or training.train
    epochs: float                # passes over train_loader per round; 0.5: half a pass (training.epochs)
    learning_rate: float
    device: str = "cpu"          # where training and float evaluation run
    keep_optimizer_state: bool = True
    mu: float = 0.0              # FedProx's proximal weight (0: off)
    scaffold: bool = False       # SCAFFOLD's gradient correction
    optimizer: torch.optim.Optimizer = None  # kept across rounds (keep_optimizer_state)
    control: dict = None         # SCAFFOLD: this site's control variate c_i (None: zeros)
    logit_offset: torch.Tensor = None  # logit adjustment's offset [classes] (None: off; training.label_shift)
    dp: DPSettings = None        # sample-level DP-SGD (Opacus) for the whole run (None: off)
    total_epochs: float = None   # every epoch of the run (rounds x epochs), for DP's accounting
    private: PrivateTraining | DistributedDPSGD = None
    round_batches: RoundBatches = field(init=False)  # where the last round stopped, for epochs below 1

    def __post_init__(self):
        self.round_batches = RoundBatches(self.train_loader, self.epochs)

    def replace_model(self, model):
        """Train `model` from now on (QAT starts): it has new parameter objects, so a kept
        optimizer would update the old ones."""
        self.model, self.optimizer = model, None

    def set_learning_rate(self, learning_rate):
        """Train at `learning_rate` from now on (a schedule over the rounds); the kept optimizer
        keeps its state and takes the new rate."""
        self.learning_rate = learning_rate
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate

    def parameter_names(self):
        return [name for name, _ in self.model.named_parameters()]

    def local_control(self):
        """SCAFFOLD's c_i by parameter name: zeros until the first round has trained."""
        if self.control is None:
            return {name: torch.zeros(parameter.shape) for name, parameter in self.model.named_parameters()}
        return self.control

    def train_round(self, server_control=None):
        """Train the model in place for `epochs`; `server_control`: SCAFFOLD's c (by name)."""
        # SCAFFOLD: the correction c - c_i; it records the round's gradients, whose mean is
        # this site's next c_i.
        control = ControlVariates(server_control or {}, self.local_control()) if self.scaffold else None
        if self.dp is not None:
            if not self.dp.distributed:  # distributed: the round's steps went through the federation
                self._train_private_round()
            return
        loader, epochs = self.round_batches.for_round()
        with self.on_device() as device:
            call_train_function(self.train_function, self.model, loader, epochs,
                                self.learning_rate, optimizer=self._round_optimizer(), device=device,
                                **self._fedprox_arguments(), **({"control": control} if control else {}),
                                **({"logit_offset": self.logit_offset} if self.logit_offset is not None else {}))
        if control is not None:
            self.control = control.updated_local(
                {name: parameter.shape for name, parameter in self.model.named_parameters()})

    def _train_private_round(self):
        """DP-SGD with the app's own loop (config refuses DP with a custom train function,
        FedProx and SCAFFOLD): Opacus' model, optimizer and Poisson-sampled loader, made once
        for the whole run so that the accountant sees every step."""
        with self.on_device() as device:
            if self.private is None:
                self.private = PrivateTraining(self.model, dp_optimizer(self.model.parameters(), self.dp),
                                               self.train_loader, self.dp, self.total_epochs or self.epochs)
            elif not self.keep_optimizer_state:
                self.private.reset_optimizer_state()
            self.private.train(self.train_function, self.epochs, self.dp.learning_rate, device)

    def start_distributed_dp(self, plan):
        """dp.noise: distributed: from now on this site contributes noisy gradient sums."""
        self.private = DistributedDPSGD(self.model, self.train_loader, self.dp, plan)

    def noisy_gradient_sum(self):
        """One step of distributed DP-SGD: this site's clipped gradient sum + its noise share."""
        return self.private.noisy_gradient_sum(self.device)

    def finish_private_training(self):
        """The model without Opacus' hooks (before quantization copies it); DP's report."""
        if self.private is None:
            return None
        self.private.close()
        return self.private.report()

    def evaluate(self, loader):
        """Loss and accuracy of the current model on `loader` (training.Evaluation)."""
        with self.on_device() as device:
            return evaluate(self.model, loader, device=device)

    @contextmanager
    def on_device(self):
        """Training and float evaluation run on `device`; in between the model stays on the
        CPU, where payloads, averaging and quantization work. (Moving keeps the parameter
        objects, so the kept optimizer's references stay valid.)"""
        self.model.to(self.device)
        try:
            yield self.device
        finally:
            self.model.to("cpu")

    def _round_optimizer(self):
        """The site's kept optimizer (global weights are loaded in place, so its references
        stay valid), or None: the train function then builds a fresh one for the round."""
        if not self.keep_optimizer_state:
            return None
        if self.optimizer is None:
            self.optimizer = make_optimizer(self.model, self.learning_rate)
        return self.optimizer

    def _fedprox_arguments(self):
        """FedProx's keywords: the round's global parameters (loaded just before training)."""
        if self.mu == 0:
            return {}
        return {"mu": self.mu,
                "global_weights": {name: parameter.detach().clone()
                                   for name, parameter in self.model.named_parameters()}}
