"""model_ema: the moving average of the rounds' global models is evaluated, kept and written;
training goes on from the global model itself (federation/site.py, Site.round_model)."""
import pytest
import torch

import quant
import testbed
from bench.simulate import load_sites, quantize_sites, run_rounds
from inputs.config import parse_config, resolve_model_ema
from inputs.errors import InputError
from tests.e2e_helpers import read_metrics
from tests.privacy_helpers import make_tiny_federation
from training import evaluate


BASE = {"model": "m.py", "train_dataset": "a.pth", "test_dataset": "b.pth"}


def globals_received(site):
    """Record a copy of every global model `site` loads (the broadcasts, in order)."""
    received, load_global = [], site.load_global

    def recording(message):
        received.append({name: tensor.clone() for name, tensor in message.weights.items()})
        load_global(message)
    site.load_global = recording
    return received


def moving_average(models, decay):
    average = models[0]
    for model in models[1:]:
        average = {name: decay * average[name] + (1 - decay) * tensor if tensor.is_floating_point() else tensor
                   for name, tensor in model.items()}
    return average


def federation(tmp_path, name, **config):
    clients, generic = make_tiny_federation(tmp_path / name, max_iter=3, keep="last", **config)
    sites = load_sites(clients, generic)
    return sites, globals_received(sites[0])


@pytest.mark.parametrize("secure", [False, True])
def test_the_written_model_is_the_average_and_training_goes_on_from_the_global(tmp_path, secure):
    plain_sites, plain_globals = federation(tmp_path, "plain", secure_aggregation=secure)
    run_rounds(plain_sites)
    sites, received = federation(tmp_path, "ema", secure_aggregation=secure, model_ema=0.5)
    run_rounds(sites)
    round_globals = received[1:]  # the first is the starting model, before round 1
    assert len(round_globals) == 3
    # Training is unchanged: the same global models as without averaging, round by round.
    for with_ema, without in zip(round_globals, plain_globals[1:]):
        for name in without:
            torch.testing.assert_close(with_ema[name], without[name], rtol=0, atol=0)
    average = moving_average(round_globals, 0.5)
    # Each round's test figures are the average's, not the global model's.
    probe = plain_sites[0].local.model
    quant.load_float_state(probe, average)
    last_round = evaluate(probe, sites[0].inputs.test_loader)
    assert sites[0].rounds[-1]["test_accuracy"] == pytest.approx(last_round.accuracy)
    assert sites[0].rounds[-1]["test_loss"] == pytest.approx(last_round.loss, rel=1e-5)
    quant.load_float_state(probe, round_globals[-1])
    assert evaluate(probe, sites[0].inputs.test_loader).loss != pytest.approx(last_round.loss, rel=1e-5)
    # What every site calibrates, converts and writes is the average.
    quantize_sites(sites)
    for site in sites:
        assert site.results["fp32"]["loss"] == pytest.approx(site.rounds[-1]["test_loss"], rel=1e-5)
        state = quant.float_state(site.local.model)
        for name, tensor in average.items():
            torch.testing.assert_close(state[name], tensor)


def test_keep_best_keeps_the_best_rounds_average(tmp_path):
    # As tests/test_validation.py: a learning rate this high makes later rounds worse.
    clients, generic = make_tiny_federation(tmp_path, learning_rate=0.3, max_iter=5, model_ema=0.5)
    sites = load_sites(clients, generic)
    received = globals_received(sites[0])
    result = run_rounds(sites)
    kept = result["selection"]["kept_round"]
    losses = [row["validation_loss"] for row in result["rounds"]]
    assert losses[kept - 1] == min(losses)
    quantize_sites(sites)
    kept_average = moving_average(received[1:kept + 1], 0.5)
    probe = sites[0].local.model
    quant.load_float_state(probe, kept_average)
    for site in sites:
        assert site.results["fp32"]["accuracy"] == pytest.approx(site.rounds[kept - 1]["test_accuracy"])
        assert site.results["fp32"]["loss"] == pytest.approx(evaluate(probe, site.inputs.test_loader).loss,
                                                             rel=1e-5)


@pytest.mark.parametrize("model_ema", [0, 0.5])
def test_keep_best_writes_the_last_rounds_model_when_it_is_the_best(tmp_path, model_ema):
    """Round 1 was kept while round 2 followed; round 2 is better: its model is written, not
    round 1's copy (with or without averaging)."""
    clients, generic = make_tiny_federation(tmp_path, max_iter=2, model_ema=model_ema)
    sites = load_sites(clients, generic)
    received = globals_received(sites[0])
    result = run_rounds(sites)
    losses = [row["validation_loss"] for row in result["rounds"]]
    assert losses[1] < losses[0] and result["selection"]["kept_round"] == 2
    expected = moving_average(received[1:], model_ema) if model_ema else received[-1]
    quantize_sites(sites)
    for site in sites:
        state = quant.float_state(site.local.model)
        for name, tensor in expected.items():
            torch.testing.assert_close(state[name], tensor)


def test_the_average_restarts_when_qat_starts(tmp_path):
    clients, generic = make_tiny_federation(tmp_path, quant_type="qat", qat_warmup_rounds=1, max_iter=3,
                                            keep="last", aggregation="fedavg", model_ema=0.5)
    sites = load_sites(clients, generic)
    received = globals_received(sites[0])
    run_rounds(sites)
    warm_up, first_qat, last = received[1:]  # the float warm-up round's model is not averaged in
    average = moving_average([first_qat, last], 0.5)
    for name, tensor in sites[0].evaluated_global.weights.items():
        torch.testing.assert_close(tensor, average[name])
    figures = quantize_sites(sites)
    assert figures["int8"]["accuracy"] > 0.5


@pytest.mark.timeout(150)
def test_the_app_writes_the_average_the_same_at_every_site(tmp_path):
    """Through the testbed (processes, HTTP, the engine): metrics.json and the report say what
    was written; model_ema: auto (the default) with half-epoch rounds is 0.5."""
    clients, generic = make_tiny_federation(tmp_path, max_iter=3, epochs=0.5)
    result = testbed.run_federation(clients, generic, tmp_path / "out", quiet=True, timeout=140)
    assert result.ok, result.message
    metrics = [read_metrics(site) for site in result.site_outputs]
    selection = metrics[0]["selection"]
    kept = selection["kept_round"]
    assert selection["model_ema"] == 0.5 and "moving average (model_ema 0.5)" in selection["reason"]
    choice = metrics[0]["model_ema"]
    assert choice["decay"] == 0.5 and choice["requested"] == "auto" and "rounds of 0.5 epochs" in choice["reason"]
    report = (result.site_outputs[0] / "report.html").read_text()
    assert "decay 0.5 (chosen by model_ema: auto: rounds of 0.5 epochs" in report
    for site_metrics in metrics:
        assert site_metrics["fp32"]["accuracy"] == pytest.approx(site_metrics["rounds"][kept - 1]["test_accuracy"])
    digests = {artifact["digest"] for site_metrics in metrics for artifact in site_metrics["artifacts"]}
    assert len(digests) == len(metrics[0]["artifacts"])


@pytest.mark.parametrize("value", [1, 1.0, -0.1, True, "0.5", "Auto"])
def test_bad_values_are_refused_naming_config_and_key(value):
    with pytest.raises(InputError, match=r"must be auto, or a number in \[0, 1\)") as error:
        parse_config({**BASE, "model_ema": value}, "config.yml")
    assert error.value.key == "model_ema" and "config.yml" in str(error.value)


@pytest.mark.parametrize("epochs, decay", [(2, 0), (1, 0), (0.75, 0), (0.5, 0.5), (0.4, 0.5), (0.25, 0.7),
                                           (0.2, 0.7), (0.125, 0.85), (0.1, 0.85), (0.0625, 0.925), (0.01, 0.925)])
def test_auto_is_the_default_and_takes_the_decay_measured_for_the_round_length(epochs, decay):
    config = parse_config({**BASE, "epochs": epochs})
    assert config.model_ema == "auto"
    resolved, choice = resolve_model_ema(config)
    assert resolved.model_ema == decay == choice["decay"] and choice["requested"] == "auto"
    assert f"rounds of {epochs:g} epochs" in choice["reason"]


@pytest.mark.parametrize("setting, why", [({"quant_type": "qat"}, "quant_type: qat"), ({"dp": {"epsilon": 3}}, "dp is set")])
def test_auto_is_off_where_averaging_was_not_measured_and_a_number_is_kept(setting, why):
    resolved, choice = resolve_model_ema(parse_config({**BASE, "epochs": 0.25, **setting}))
    assert resolved.model_ema == 0 and why in choice["reason"]
    resolved, choice = resolve_model_ema(parse_config({**BASE, "epochs": 0.25, "model_ema": 0.3, **setting}))
    assert resolved.model_ema == 0.3 and choice == {"decay": 0.3, "requested": 0.3, "reason": "set in config.yml"}
