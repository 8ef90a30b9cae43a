"""Sample-level differential privacy for one site's training: DP-SGD with Opacus.

Plain PyTorch and Opacus (nothing here knows about FeatureCloud). One `PrivateTraining` lives
for the whole run: Opacus wraps the site's model (per-sample gradients), its optimizer
(per-sample clipping to `max_grad_norm`, Gaussian noise) and its train loader (Poisson sampling
with rate batch_size / n_train, which the accountant assumes). The noise multiplier is
calibrated once, with Opacus' RDP accountant, for every step of the run: max_iter rounds x
epochs x (1 / sampling rate) steps, so the model weights a site releases after any round are
within (epsilon, delta) for its own training samples (post-processing: averaging, the
server's rule and quantization of DP weights keep the guarantee).

What the guarantee does not cover is listed in README.md ("Differential privacy").
"""
import secrets
import warnings
from dataclasses import dataclass

import torch

OPACUS_WARNINGS = (
    r".*Secure RNG turned off.*",
    r".*Optimal order is the (largest|smallest) alpha.*",
    r".*Using a non-full backward hook.*",
    r".*full_backward_hook.*",
)


class PrivacyError(ValueError):
    """The model or the settings cannot be trained with DP-SGD; says why."""


@dataclass(frozen=True)
class DPSettings:
    epsilon: float
    delta: float
    max_grad_norm: float
    # DP-SGD's own batch and step (docs/privacy.md says why they differ from plain training's):
    # the expected Poisson batch (None: the train loader's) and SGD's learning rate (None: the
    # optimizer given to PrivateTraining is used as it is).
    batch_size: int = None
    learning_rate: float = None

    @classmethod
    def from_config(cls, dp):
        if dp is None:
            return None
        return cls(float(dp["epsilon"]), float(dp["delta"]), float(dp["max_grad_norm"]),
                   int(dp["batch_size"]), float(dp["learning_rate"]))


def dp_optimizer(model, settings: DPSettings):
    """DP-SGD's optimizer: SGD with momentum 0.9. Not Adam: under DP, Adam's second moment
    is dominated by the noise, so its step shrinks as the noise grows; a small site, which
    carries more noise than the union would, then barely moves in a federated round."""
    return torch.optim.SGD(model.parameters(), lr=settings.learning_rate, momentum=0.9)


def unsupported_layers(model):
    """Opacus' objections to `model` (e.g. BatchNorm mixes samples, so per-sample gradients
    do not exist), one line each naming the layer; empty when DP-SGD can train it."""
    from opacus.validators import ModuleValidator

    problems = []
    for name, module in model.named_modules():
        if next(module.children(), None) is not None:
            continue  # containers: their layers are checked one by one
        for error in ModuleValidator.validate(module, strict=False):
            problems.append(f"layer '{name}' ({type(module).__name__}): {str(error).strip()}")
    if not problems:  # e.g. a container-level objection
        problems = [str(error) for error in ModuleValidator.validate(model, strict=False)]
    return problems


def check_model(model):
    problems = unsupported_layers(model)
    if problems:
        raise PrivacyError(
            "Opacus cannot train this model with per-sample gradients: " + "; ".join(problems)
            + ". Replace these layers (e.g. BatchNorm by GroupNorm, as Opacus' "
              "ModuleValidator.fix does) in your model file")


def _quiet():
    context = warnings.catch_warnings()
    context.__enter__()
    for pattern in OPACUS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    return context


class PrivateTraining:
    """DP-SGD state for one site across every round: the wrapped model, optimizer and loader."""

    def __init__(self, model, optimizer, train_loader, settings: DPSettings, total_epochs: int):
        from opacus import PrivacyEngine
        from opacus.data_loader import DPDataLoader

        check_model(model)
        self.settings = settings
        self.total_epochs = total_epochs
        # Noise and Poisson sampling draw from a generator seeded from the OS's entropy, not
        # from the run's `seed`: config.yml is the same at every site, and noise that another
        # site could replay would protect nothing. (So DP runs do not repeat bit for bit.)
        self.generator = torch.Generator().manual_seed(secrets.randbits(63))
        context = _quiet()
        try:
            self.engine = PrivacyEngine(accountant="rdp")
            loader = self._poisson_loader(train_loader, DPDataLoader)
            self.module, self.optimizer, self.loader = self.engine.make_private_with_epsilon(
                module=model, optimizer=optimizer, data_loader=loader,
                target_epsilon=settings.epsilon, target_delta=settings.delta, epochs=total_epochs,
                max_grad_norm=settings.max_grad_norm, poisson_sampling=False,
                noise_generator=self.generator)
        finally:
            context.__exit__(None, None, None)
        self.sample_rate = 1 / len(loader)  # what Opacus' accountant uses
        self.noise_multiplier = float(self.optimizer.noise_multiplier)

    def _poisson_loader(self, train_loader, loader_class):
        """Poisson sampling with rate dp batch_size / n_train (the train loader's batch when
        the settings name none), as the accountant assumes."""
        if self.settings.batch_size is None:
            return loader_class.from_data_loader(train_loader, generator=self.generator)
        n_train = len(train_loader.dataset)
        return loader_class(train_loader.dataset, sample_rate=min(1.0, self.settings.batch_size / n_train),
                            collate_fn=train_loader.collate_fn, generator=self.generator)

    def reset_optimizer_state(self):
        """A fresh optimizer state (keep_optimizer_state: false) behind the same DP wrapper."""
        self.optimizer.original_optimizer.state.clear()

    def train(self, train_function, epochs, learning_rate, device, **extras):
        """One round of DP-SGD with the app's train loop."""
        context = _quiet()
        try:
            return train_function(self.module, self.loader, epochs, learning_rate,
                                  optimizer=self.optimizer, device=device, **extras)
        finally:
            context.__exit__(None, None, None)

    @property
    def steps(self):
        return sum(steps for _, _, steps in self.engine.accountant.history)

    def epsilon_spent(self):
        if not self.engine.accountant.history:
            return 0.0
        context = _quiet()
        try:
            return float(self.engine.get_epsilon(self.settings.delta))
        finally:
            context.__exit__(None, None, None)

    def close(self):
        """Remove Opacus' hooks and per-sample attributes: the model is plain again (for
        quantization, which copies it)."""
        self.module._close()
        for parameter in self.module._module.parameters():
            for name in ("grad_sample", "_forward_counter", "_current_grad_sample"):
                if hasattr(parameter, name):
                    delattr(parameter, name)

    def report(self):
        """What metrics.json says about this site's DP."""
        return {"epsilon_target": self.settings.epsilon, "delta": self.settings.delta,
                "max_grad_norm": self.settings.max_grad_norm, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "steps": self.steps, "epochs_planned": self.total_epochs,
                "epsilon_spent": self.epsilon_spent(), "accountant": "rdp"}
