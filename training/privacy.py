"""Sample-level differential privacy for one site's training: DP-SGD with Opacus.

Plain PyTorch and Opacus (nothing here knows about FeatureCloud). One `PrivateTraining` lives
for the whole run: Opacus wraps the site's model (per-sample gradients), its optimizer
(per-sample clipping to `max_grad_norm`, Gaussian noise) and its train loader (Poisson sampling
with rate batch_size / n_train, which the accountant assumes). The noise multiplier is
calibrated once, with Opacus' RDP accountant, for every step of the run: max_iter rounds x
epochs x (1 / sampling rate) steps, so the model weights a site releases after any round are
within (epsilon, delta) for its own training samples (post-processing: averaging, the
server's rule and quantization of DP weights keep the guarantee).

`dp.noise: distributed` (DistributedDPSGD, NoisyGradientDescent) runs DP-SGD on the union of
the sites' data instead: one optimizer step per secure sum, each site adding only its share of
the noise (docs/privacy.md, "Distributed noise").

What the guarantee does not cover is listed in README.md ("Differential privacy").
"""
import functools
import math
import secrets
import warnings
from dataclasses import dataclass

import torch

from training.epochs import RoundBatches

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
    # "local": each site's DP-SGD is private by itself (PrivateTraining); "distributed": the
    # noise is split across the sites and only their secure sum is private (DistributedDPSGD).
    noise: str = "local"
    # distributed: how many other sites may pool what they know with the coordinator while the
    # guarantee still holds (a number, or "all": every other site).
    colluding_sites: int | str = 0

    @classmethod
    def from_config(cls, dp):
        if dp is None:
            return None
        return cls(float(dp["epsilon"]), float(dp["delta"]), float(dp["max_grad_norm"]),
                   int(dp["batch_size"]), float(dp["learning_rate"]), dp.get("noise", "local"),
                   dp.get("colluding_sites", 0))

    @property
    def distributed(self):
        return self.noise == "distributed"


def dp_optimizer(parameters, settings: DPSettings):
    """DP-SGD's optimizer: SGD with momentum 0.9. Not Adam: under DP, Adam's second moment
    is dominated by the noise, so its step shrinks as the noise grows; a small site, which
    carries more noise than the union would, then barely moves in a federated round."""
    return torch.optim.SGD(parameters, lr=settings.learning_rate, momentum=0.9)


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
        self.round_batches = None
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
        """One round of DP-SGD with the app's train loop (`epochs` below 1: the next slice of
        the Poisson loader's stream of epochs, training.epochs)."""
        if self.round_batches is None:
            self.round_batches = RoundBatches(self.loader, epochs)
        loader, epochs = self.round_batches.for_round()
        context = _quiet()
        try:
            return train_function(self.module, loader, epochs, learning_rate,
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


# ---- dp.noise: distributed -------------------------------------------------------------------
#
# DP-SGD on the union of the sites' data, each step one secure sum: every site Poisson-samples
# its own records at the federation's rate q (together: a Poisson sample of the union at q),
# clips each record's gradient to max_grad_norm C, sums them and adds Gaussian noise of standard
# deviation sigma * C / sqrt(n_sites). The sum over the sites is the clipped gradient sum of the
# union's batch plus noise of standard deviation sigma * C: exactly centralized DP-SGD's step,
# so the accountant is centralized DP-SGD's (sigma, q, steps). The coordinator divides by the
# expected batch and takes the SGD (momentum) step: post-processing.
#
# dp.colluding_sites t: if t other sites pool their own noise with the coordinator, they can
# subtract it from the sum, and only the honest sites' shares are left. So each site adds
# sigma * C / sqrt(n_sites - t): any n_sites - t of them still make up sigma * C, and the guarantee
# (epsilon, delta) holds against the coordinator and any t sites together. t = n_sites - 1
# ("all"): every site adds the whole sigma * C, so its own contribution is private by itself
# (each site samples its records at rate q too); the sum carries sqrt(n_sites) x that noise.

@dataclass(frozen=True)
class DistributedPlan:
    """The schedule every site derives alike from the federation's totals."""
    sample_rate: float        # q: each record's chance to be in a step's batch
    expected_batch: float     # q * N: what the summed gradient is divided by
    steps_per_round: int      # epochs per round / q
    total_steps: int
    noise_multiplier: float   # sigma: the noise the guarantee rests on (the accountant's)
    n_sites: int
    colluding_sites: int = 0  # t: the guarantee holds against the coordinator and any t sites

    @property
    def share_multiplier(self):
        """The noise multiplier each site adds: variance sigma^2 / (n_sites - t), so that any
        n_sites - t honest sites' shares make up sigma."""
        return self.noise_multiplier / math.sqrt(self.n_sites - self.colluding_sites)

    @property
    def sum_multiplier(self):
        """The noise multiplier of the sum of all shares: sigma, or more when t > 0."""
        return self.share_multiplier * math.sqrt(self.n_sites)


def resolve_colluding_sites(colluding_sites, n_sites):
    """dp.colluding_sites as a number of sites: "all" is every other site; one more than that
    would leave no honest site whose noise the guarantee could rest on."""
    if colluding_sites == "all":
        return n_sites - 1
    if colluding_sites >= n_sites:
        raise PrivacyError(f"colluding_sites {colluding_sites} must be below the number of sites, "
                           f"{n_sites} (the guarantee rests on the noise of the sites that do not collude; "
                           f"'all' is every other site: {n_sites - 1})")
    return colluding_sites


@functools.lru_cache(maxsize=8)  # the coordinator needs it twice (as a site, to step); seconds each
def distributed_plan(settings: DPSettings, n_train_total, n_sites, rounds, epochs):
    """q = dp.batch_size / N; epochs / q steps per round; sigma for (epsilon, delta) over all."""
    from opacus.accountants.utils import get_noise_multiplier

    colluding_sites = resolve_colluding_sites(settings.colluding_sites, n_sites)
    sample_rate = min(1.0, settings.batch_size / n_train_total)
    steps_per_round = max(1, round(epochs / sample_rate))
    total_steps = rounds * steps_per_round
    context = _quiet()
    try:
        sigma = get_noise_multiplier(target_epsilon=settings.epsilon, target_delta=settings.delta,
                                     sample_rate=sample_rate, steps=total_steps, accountant="rdp")
    finally:
        context.__exit__(None, None, None)
    return DistributedPlan(sample_rate, sample_rate * n_train_total, steps_per_round, total_steps,
                           float(sigma), n_sites, colluding_sites)


def gradient_sum_bound(plan: DistributedPlan, max_grad_norm, n_parameters):
    """A norm that one step's summed noisy gradient exceeds with probability below 1e-8 while
    every site follows the protocol: the union's Poisson batch (mean q N, + 8 standard
    deviations + 8: by Chernoff's bound exceeded with probability below 1e-8 for any mean) of
    gradients clipped to C, plus the shares' Gaussian noise of s C per coordinate (s: the sum's
    multiplier; its norm exceeds s C (sqrt(d) + t) with probability below exp(-t^2 / 2); t = 8)."""
    batch = plan.expected_batch + 8 * math.sqrt(plan.expected_batch) + 8
    noise = plan.sum_multiplier * max_grad_norm * (math.sqrt(n_parameters) + 8)
    return max_grad_norm * batch + noise


def rdp_epsilon(noise_multiplier, sample_rate, steps, delta):
    """Opacus' RDP accountant's epsilon after `steps` sampled Gaussian steps."""
    from opacus.accountants import RDPAccountant

    if steps == 0:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    context = _quiet()
    try:
        return float(accountant.get_epsilon(delta))
    finally:
        context.__exit__(None, None, None)


class DistributedDPSGD:
    """One site's half of distributed DP-SGD: per step, its clipped per-sample gradient sum plus
    its share of the noise (Opacus' GradSampleModule and DPOptimizer clip and add the noise;
    the step itself is the coordinator's, NoisyGradientDescent)."""

    def __init__(self, model, train_loader, settings: DPSettings, plan: DistributedPlan):
        from opacus import GradSampleModule
        from opacus.data_loader import DPDataLoader
        from opacus.optimizers import DPOptimizer

        check_model(model)
        self.settings, self.plan = settings, plan
        self.steps = 0
        # Secret noise and sampling, as in PrivateTraining: a peer must not be able to replay them.
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        self.loader = DPDataLoader(train_loader.dataset, sample_rate=plan.sample_rate,
                                   collate_fn=train_loader.collate_fn, generator=generator)
        self._batches = iter(())
        context = _quiet()
        try:
            self.module = GradSampleModule(model, loss_reduction="sum")
            # Never stepped: pre_step() clips, sums and adds the noise into .grad; with
            # loss_reduction "sum" the sum is not divided (the coordinator divides the total).
            self.optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0),
                                         noise_multiplier=plan.share_multiplier,
                                         max_grad_norm=settings.max_grad_norm, expected_batch_size=None,
                                         loss_reduction="sum", generator=generator)
        finally:
            context.__exit__(None, None, None)

    def _next_batch(self):
        batch = next(self._batches, None)
        if batch is None:  # an epoch of the Poisson loader is done: start the next
            self._batches = iter(self.loader)
            batch = next(self._batches)
        return batch

    def noisy_gradient_sum(self, device="cpu"):
        """This step's contribution by parameter name: clipped gradient sum + noise share."""
        inputs, labels = self._next_batch()
        context = _quiet()
        try:
            self.module.to(device).train()
            self.optimizer.zero_grad(set_to_none=True)
            logits = self.module(inputs.to(device))
            torch.nn.functional.cross_entropy(logits, labels.to(device), reduction="sum").backward()
            self.optimizer.pre_step()
            gradient = {name: parameter.grad.detach().cpu().clone()
                        for name, parameter in self.module._module.named_parameters() if parameter.requires_grad}
            self.optimizer.zero_grad(set_to_none=True)
        finally:
            self.module.to("cpu")
            context.__exit__(None, None, None)
        self.steps += 1
        return gradient

    def epsilon_spent(self):
        """The guarantee against the coordinator with up to colluding_sites other sites."""
        return rdp_epsilon(self.plan.noise_multiplier, self.plan.sample_rate, self.steps, self.settings.delta)

    def epsilon_if_peers_collude(self):
        """What this site's own noise share guarantees alone: if every other site and the
        coordinator pooled what they know, only this share would be left (with colluding_sites
        "all": the budget itself)."""
        return rdp_epsilon(self.plan.share_multiplier, self.plan.sample_rate, self.steps, self.settings.delta)

    def close(self):
        """Remove Opacus' hooks: the model is plain again (for quantization, which copies it)."""
        self.module._close()
        for parameter in self.module._module.parameters():
            for name in ("grad_sample", "_forward_counter", "_current_grad_sample", "summed_grad"):
                if hasattr(parameter, name):
                    delattr(parameter, name)

    def report(self):
        return {"noise": "distributed", "epsilon_target": self.settings.epsilon, "delta": self.settings.delta,
                "max_grad_norm": self.settings.max_grad_norm, "noise_multiplier": self.plan.noise_multiplier,
                "noise_multiplier_own_share": self.plan.share_multiplier, "n_sites": self.plan.n_sites,
                "colluding_sites": self.plan.colluding_sites, "noise_multiplier_sum": self.plan.sum_multiplier,
                "sample_rate": self.plan.sample_rate, "steps": self.steps,
                "epochs_planned": self.plan.total_steps * self.plan.sample_rate,
                "epsilon_spent": self.epsilon_spent(),
                "epsilon_if_peers_collude": self.epsilon_if_peers_collude(), "accountant": "rdp"}


class NoisyGradientDescent:
    """The coordinator's half: dp_optimizer (SGD with momentum, as centralized DP-SGD steps) on
    the summed noisy gradient divided by the expected batch. It steps its own copy of the
    trainable parameters, loaded from the current global model before every step."""

    def __init__(self, settings: DPSettings, expected_batch):
        self.settings, self.expected_batch = settings, expected_batch
        self.parameters = None  # name -> the tensor the optimizer steps (made at the first step)
        self.optimizer = None

    def reset(self):
        """A fresh momentum (keep_optimizer_state: false)."""
        if self.optimizer is not None:
            self.optimizer.state.clear()

    @torch.no_grad()
    def step(self, weights, gradient_sum):
        """`weights` (by name) after one step; names without a gradient stay."""
        if self.parameters is None:
            self.parameters = {name: weights[name].clone() for name in gradient_sum}
            self.optimizer = dp_optimizer(list(self.parameters.values()), self.settings)
        for name, parameter in self.parameters.items():
            parameter.copy_(weights[name])
            parameter.grad = (gradient_sum[name] / self.expected_batch).to(parameter.dtype)
        self.optimizer.step()
        return {**weights, **{name: parameter.clone() for name, parameter in self.parameters.items()}}
