"""Everything one site was given, read and checked once: config, datasets, model, train function.

`load_site_inputs` is what the `initial` state runs; every problem is an InputError naming
the file and key, raised at the site that has it.
"""
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Subset

import quant
from inputs.config import CONFIG_FILE, load_config, resolve_aggregation, resolve_logit_adjustment, resolve_model_ema
from inputs.datasets import describe_dataset, load_dataset
from inputs.errors import InputError
from inputs.model_file import check_model_on_data, load_model
from inputs.train_function import accepts_keyword, check_train_function_supports, load_train_function
from inputs.validation_split import split_for_validation
from training import make_loader, seed_everything, train
from training.label_shift import label_counts
from training.privacy import unsupported_layers


@dataclass(frozen=True)
class SiteInputs:
    input_dir: Path
    config: object          # inputs.config.AppConfig
    model: nn.Module        # the user's model, freshly built (seeded)
    train_loader: object    # the train set less the validation split: what is trained on
    test_loader: object
    train_info: object      # inputs.datasets.DatasetInfo (of what is trained on)
    test_info: object
    train_function: object  # the user's train(), or training.train
    device: str             # where training and float evaluation run
    validation_loader: object = None  # the validation split (None: validation_fraction 0)
    validation_info: object = None
    # How config.aggregation was chosen: {rule, requested (auto or the rule), reason}.
    aggregation_choice: dict = None
    # How config.logit_adjustment was chosen: {strength, requested (auto or the number), reason}.
    logit_adjustment_choice: dict = None
    # How config.model_ema was chosen: {decay, requested (auto or the number), reason}.
    model_ema_choice: dict = None
    n_outputs: int = None     # the model's class scores per sample (the same at every site)
    float_layers: tuple = ()  # the layers the int8 model keeps in float (float_output_layer)

    @property
    def config_file(self):
        return self.input_dir / CONFIG_FILE

    @property
    def example_inputs(self):
        """One test sample, as quantization's example input."""
        return (next(iter(self.test_loader))[0][:1],)

    def summary(self):
        """What the coordinator needs to check that the sites fit together."""
        return {"n_train": self.train_info.n, "n_test": self.test_info.n,
                "input_shape": list(self.train_info.input_shape),
                "n_classes": max(self.train_info.n_classes, self.test_info.n_classes)}

    def label_counts(self):
        """How many training samples (validation split left out) each of the model's classes has."""
        return label_counts(self.train_info.sample_labels, self.n_outputs)


def load_site_inputs(input_dir) -> SiteInputs:
    """Read and check everything in `input_dir`; InputError names what is wrong."""
    input_dir = Path(input_dir)
    config = load_config(input_dir)
    train_function = _load_train_function(config, input_dir)
    # aggregation: auto is resolved here, once, before anything reads config.aggregation.
    config, aggregation_choice = resolve_aggregation(config, accepts_keyword(train_function, "control"))
    config, logit_adjustment_choice = resolve_logit_adjustment(config, accepts_keyword(train_function, "logit_offset"))
    config, model_ema_choice = resolve_model_ema(config)
    if config.train_function:
        check_train_function_supports(train_function, _keywords_needed(config), input_dir / config.train_function)
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
    train_set, train_info, validation = _hold_out_validation(train_set, train_info, config, input_dir / CONFIG_FILE)
    train_loader = make_loader(train_set, config.batch_size, shuffle=True, seed=config.seed)
    test_loader = make_loader(test_set, config.batch_size, shuffle=False)
    n_classes = max(train_info.n_classes, test_info.n_classes)
    n_outputs = check_model_on_data(model, next(iter(train_loader))[0], n_classes, input_dir / config.model)
    if config.dp is not None:
        problems = unsupported_layers(model)
        if problems:
            raise InputError(input_dir / CONFIG_FILE, "Opacus cannot compute per-sample gradients for "
                             f"the model in {config.model}: {'; '.join(problems)}. Replace these layers "
                             "(e.g. BatchNorm by GroupNorm, as Opacus' ModuleValidator.fix does) or "
                             "set dp: null", key="dp")
    float_layers = _float_layers(config, model, next(iter(test_loader))[0][:1], input_dir / CONFIG_FILE)
    return SiteInputs(input_dir, config, model, train_loader, test_loader, train_info, test_info,
                      train_function, resolve_device(config.device, input_dir / CONFIG_FILE), *validation,
                      aggregation_choice=aggregation_choice, logit_adjustment_choice=logit_adjustment_choice,
                      model_ema_choice=model_ema_choice,
                      n_outputs=n_outputs, float_layers=float_layers)


def _float_layers(config, model, example, config_path):
    """float_output_layer: true needs the output layer (else an error here, at start); auto
    takes it where the model and backend allow, and quantizes everything where they do not."""
    if not config.wants_float_output_layer:
        return ()
    try:
        return (quant.float_output_layer(model, (example,), config.backend),)
    except quant.QuantizationError as error:
        if config.float_output_layer is True:
            raise InputError(config_path, f"{error}; or set float_output_layer: false",
                             key="float_output_layer") from None
        return ()


def _load_train_function(config, input_dir):
    """The user's train() from config's train_function, or the app's own loop."""
    if not config.train_function:
        return train
    return load_train_function(input_dir / config.train_function)


def _hold_out_validation(train_set, train_info, config, config_path):
    """(what is trained on, its DatasetInfo, (validation loader, its DatasetInfo) or (None, None)):
    the validation split comes out of the training data, never the test set."""
    if config.validation_fraction == 0:
        return train_set, train_info, (None, None)
    train_indices, validation_indices = split_for_validation(
        train_info.sample_labels, config.validation_fraction, config.seed, config_path)
    validation_loader = make_loader(Subset(train_set, validation_indices), config.batch_size, shuffle=False)
    return (Subset(train_set, train_indices), train_info.subset(train_indices),
            (validation_loader, train_info.subset(validation_indices)))


def _keywords_needed(config):
    """The keywords a custom train function must accept for this config (name -> why): without
    them it would silently train without what the federation believes it applies."""
    needed = {}
    if config.mu != 0:
        needed["mu"] = needed["global_weights"] = f"config sets mu: {config.mu} (FedProx)"
    if config.aggregation == "scaffold":
        needed["control"] = "config sets aggregation: scaffold"
    if config.logit_adjustment > 0:
        needed["logit_offset"] = f"config sets logit_adjustment: {config.logit_adjustment}"
    return needed


def resolve_device(device, config_path):
    """"auto": the GPU when PyTorch sees one, else the CPU; "cuda" without a GPU is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError(config_path, "is cuda, but PyTorch sees no GPU on this machine "
                         "(use auto or cpu)", key="device")
    return device
