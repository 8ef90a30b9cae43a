"""config.yml validation: defaults, both layouts, the federation keys (aggregation, server
optimizer, mu, device, communication), and an error naming file and key for each mistake."""
import pytest
import torch

from inputs.site_inputs import resolve_device
from inputs.config import AppConfig, InputError, load_config, parse_config, resolve_aggregation

BASE = {"model": "mnist_model.py", "train_dataset": "train.pth", "test_dataset": "test.pth"}


def test_flat_seed_keys_with_defaults():
    config = parse_config(dict(BASE))
    assert config == AppConfig(**BASE)
    assert (config.batch_size, config.backend, config.quant_type, config.model_class) == (32, "x86", "post_static", "Model")


def test_keys_under_app_section_and_other_apps_ignored():
    document = {"fc_quantization": {**BASE, "backend": "qnnpack", "max_iter": 3}, "fc_deep": {"x": 1}}
    config = parse_config(document)
    assert (config.backend, config.max_iter) == ("qnnpack", 3)


def test_all_seed_keys_accepted():
    config = parse_config({**BASE, "batch_size": 64, "learning_rate": 0.01, "epochs": 2, "max_iter": 4,
                           "backend": "fbgemm", "quant_type": "qat"})
    assert (config.batch_size, config.learning_rate, config.epochs, config.max_iter) == (64, 0.01, 2, 4)


def test_learning_rate_defaults_to_0_005_and_to_0_002_for_qat_unless_set():
    assert parse_config(dict(BASE)).learning_rate == 0.005
    assert parse_config({**BASE, "quant_type": "qat"}).learning_rate == 0.002
    assert parse_config({**BASE, "quant_type": "qat", "learning_rate": 0.005}).learning_rate == 0.005


@pytest.mark.parametrize("change, key, text", [
    ({"batch_size": 0}, "batch_size", "integer >= 1"),
    ({"batch_size": True}, "batch_size", "integer >= 1"),
    ({"batch_size": "32"}, "batch_size", "integer >= 1"),
    ({"learning_rate": -0.1}, "learning_rate", "> 0"),
    ({"epochs": 0}, "epochs", "number > 0"),
    ({"epochs": True}, "epochs", "number > 0"),
    ({"max_iter": 0}, "max_iter", "integer >= 1"),
    ({"backend": "tensorrt"}, "backend", "fbgemm, qnnpack, x86"),
    ({"quant_type": "dynamic"}, "quant_type", "post_static, qat"),
    ({"model": "model.txt"}, "model", ".py"),
    ({"model_kwargs": [1]}, "model_kwargs", "mapping"),
    ({"bogus": 1}, "bogus", "known keys: model, train_dataset"),
    ({"quant_type": "qat", "max_iter": 2, "qat_warmup_rounds": 2}, "qat_warmup_rounds", "less than max_iter"),
])
def test_bad_values_name_the_key(change, key, text):
    with pytest.raises(InputError) as error:
        parse_config({**BASE, **change}, "in/config.yml")
    assert error.value.key == key
    assert "in/config.yml" in str(error.value) and f"'{key}'" in str(error.value) and text in str(error.value)


@pytest.mark.parametrize("missing", ["model", "train_dataset", "test_dataset"])
def test_missing_required_key(missing):
    document = {k: v for k, v in BASE.items() if k != missing}
    with pytest.raises(InputError, match=f"key '{missing}': required key is missing"):
        parse_config(document)


def test_missing_file_and_yaml_syntax_error(tmp_path):
    with pytest.raises(InputError, match="config.yml: config file not found"):
        load_config(tmp_path)
    (tmp_path / "config.yml").write_text("model: [unclosed\n")
    with pytest.raises(InputError, match="config.yml: not valid YAML"):
        load_config(tmp_path)
    (tmp_path / "config.yml").write_text("- a list\n")
    with pytest.raises(InputError, match="must be a mapping"):
        load_config(tmp_path)


def test_qat_schedule_follows_recipe():
    config = parse_config({**BASE, "quant_type": "qat", "max_iter": 5})
    first, freeze_bn, freeze_observers = config.qat_schedule()
    assert first == 1 and freeze_bn == 4 and freeze_observers == 5
    config = parse_config({**BASE, "quant_type": "qat", "max_iter": 5, "qat_warmup_rounds": 2,
                           "qat_freeze_observers_round": 4})
    assert config.qat_schedule()[0] == 3 and config.qat_schedule()[2] == 4


# ---- federation keys: aggregation, server optimizer, mu, device, communication --------------

def test_federation_keys_default_to_auto_aggregation_in_float32():
    config = parse_config(dict(BASE))
    assert (config.aggregation, config.mu, config.communication, config.device) == \
        ("auto", 0.0, "float32", "auto")
    assert config.server_learning_rate is None
    assert config.server_betas == (0.9, 0.99)


def test_valid_federation_values_are_taken():
    config = parse_config({**BASE, "aggregation": "fedadam", "server_learning_rate": 0.02,
                           "server_momentum": 0.5, "server_betas": [0.8, 0.95], "server_epsilon": 1e-4,
                           "mu": 0.01, "device": "cpu", "communication": "int8"})
    assert (config.aggregation, config.server_learning_rate, config.server_momentum) == ("fedadam", 0.02, 0.5)
    assert (config.server_epsilon, config.mu, config.device) == (1e-4, 0.01, "cpu")
    assert config.server_betas == (0.8, 0.95)
    assert config.to_dict()["communication"] == "int8"


# aggregation: auto -> scaffold unless a setting excludes it (then fedavg); resolved once per
# site by inputs.site_inputs.load_site_inputs, from the config and the train function's signature.
AUTO_TO_FEDAVG = {
    "qat": ({"quant_type": "qat"}, True, "quant_type: qat"),
    "dp": ({"dp": {"epsilon": 8.0}}, True, "dp is set"),
    "fedprox": ({"mu": 0.01}, True, "mu: 0.01"),
    "train function without control": ({"train_function": "my_train.py"}, False, "accepts no control="),
}


@pytest.mark.parametrize("case", list(AUTO_TO_FEDAVG))
def test_auto_aggregation_is_fedavg_where_a_setting_excludes_scaffold(case):
    changes, accepts_control, reason = AUTO_TO_FEDAVG[case]
    config, choice = resolve_aggregation(parse_config({**BASE, **changes}), accepts_control)
    assert config.aggregation == "fedavg"
    assert choice["rule"] == "fedavg" and choice["requested"] == "auto" and reason in choice["reason"]
    assert config == parse_config({**BASE, **changes, "aggregation": "fedavg"})  # nothing else changes


@pytest.mark.parametrize("changes", [{}, {"train_function": "my_train.py"}, {"secure_aggregation": True},
                                     {"communication": "int8"}, {"aggregation": "auto"}])
def test_auto_aggregation_is_scaffold_otherwise(changes):
    config, choice = resolve_aggregation(parse_config({**BASE, **changes}), True)
    assert config.aggregation == "scaffold"
    assert (choice["rule"], choice["requested"]) == ("scaffold", "auto")
    assert config == parse_config({**BASE, **changes, "aggregation": "scaffold"})


@pytest.mark.parametrize("rule", ["fedavg", "fedavgm", "fedadam", "scaffold"])
@pytest.mark.parametrize("accepts_control", [True, False])
def test_an_explicit_aggregation_is_kept(rule, accepts_control):
    config = parse_config({**BASE, "aggregation": rule, "mu": 0.01})
    resolved, choice = resolve_aggregation(config, accepts_control)
    assert resolved is config and choice == {"rule": rule, "requested": rule, "reason": "set in config.yml"}


@pytest.mark.parametrize("changes", [{"quant_type": "qat"}, {"dp": {"epsilon": 8.0}}])
def test_explicit_scaffold_is_still_refused_where_auto_falls_back(changes):
    with pytest.raises(InputError):
        parse_config({**BASE, **changes, "aggregation": "scaffold"})
    assert parse_config({**BASE, **changes}).aggregation == "auto"


@pytest.mark.parametrize("key, value", [
    ("aggregation", "fedyogi"), ("aggregation", None), ("aggregation", "Auto"),
    ("server_learning_rate", 0), ("server_learning_rate", -1.0), ("server_learning_rate", True),
    ("server_momentum", 1.0), ("server_momentum", -0.1),
    ("server_betas", [0.9]), ("server_betas", [0.9, 1.0]), ("server_betas", "0.9, 0.99"),
    ("server_betas", [True, 0.9]),
    ("server_epsilon", 0), ("mu", -0.01), ("mu", "0.1"),
    ("device", "gpu"), ("device", "cuda:0"), ("communication", "int4"), ("communication", "float16"),
])
def test_bad_federation_values_name_the_key(key, value):
    with pytest.raises(InputError) as error:
        parse_config({**BASE, key: value}, "in/config.yml")
    assert error.value.key == key
    assert "in/config.yml" in str(error.value) and f"'{key}'" in str(error.value)


def test_device_cuda_without_a_gpu_is_an_input_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="device.*no GPU"):
        resolve_device("cuda", "config.yml")
    assert resolve_device("auto", "config.yml") == "cpu"
    assert resolve_device("cpu", "config.yml") == "cpu"


def test_device_auto_takes_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", "config.yml") == "cuda"
    assert resolve_device("cpu", "config.yml") == "cpu"
