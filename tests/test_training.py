"""training/: seeding, loaders, the default train loop and evaluation (plain PyTorch)."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from training import evaluate, make_loader, seed_everything, train

ROOT = Path(__file__).resolve().parent.parent
MNIST_MODEL = ROOT / "data" / "sample" / "generic" / "mnist_model.py"
CIFAR_MODEL = ROOT / "data" / "models" / "cifar_model.py"
CLIENT_1 = ROOT / "data" / "sample" / "client_1"


def model_class(path):
    spec = importlib.util.spec_from_file_location(f"model_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Model


def client_1(split):
    return TensorDataset(*torch.load(CLIENT_1 / f"{split}_dataset.pth", weights_only=True))


def random_images(n, shape, n_classes=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand((n, *shape), generator=generator),
                         torch.randint(0, n_classes, (n,), generator=generator))


@pytest.fixture
def one_thread():
    """Tiny batches run fastest on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_lenet_learns_client_1_digits_in_two_epochs(one_thread):
    """How long it takes is a benchmark figure (python -m bench.training), not a test."""
    seed_everything(0)
    model = model_class(MNIST_MODEL)()
    loader = make_loader(client_1("train"), batch_size=8, shuffle=True, seed=0)
    metrics = train(model, loader, epochs=2, learning_rate=2e-3)
    result = evaluate(model, make_loader(client_1("test"), batch_size=256, shuffle=False))
    assert result.n == 334
    assert result.accuracy > 0.85, result.accuracy
    assert 0 < metrics["loss"] < 1 and 0.7 < metrics["accuracy"] <= 1


def test_training_benchmark_reports_cpu_time_and_what_the_run_learned(tmp_path):
    import bench.training
    document = bench.training.main(["--repeats", "1", "--out", str(tmp_path / "training.json")])
    written = json.loads((tmp_path / "training.json").read_text())
    assert written == json.loads(json.dumps(document))
    assert (written["n_train"], written["n_test"], written["epochs"]) == (1333, 334, 2)
    assert written["cpu_s_median"] > 0 and written["wall_s_median"] > 0
    assert written["test_accuracy"] > 0.85


class ClassFromFirstPixel(nn.Module):
    """Known outputs: predicts the class written in the input's first value, with logit 2."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Linear(1, 1)  # a parameter, so the model has a device

    def forward(self, x):
        return 2.0 * nn.functional.one_hot(x[:, 0].long(), num_classes=4).float()


@pytest.mark.parametrize("start_in_training_mode", [True, False])
def test_evaluate_counts_and_scores_known_predictions(start_in_training_mode):
    predicted = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    labels = torch.tensor([0, 1, 2, 0, 1, 1, 3])   # 4 of 7 correct
    model = ClassFromFirstPixel().train(start_in_training_mode)
    result = evaluate(model, make_loader(TensorDataset(predicted[:, None].float(), labels), 3, shuffle=False))

    assert result.n == 7
    assert result.accuracy == pytest.approx(4 / 7)
    assert torch.equal(result.y_true, labels) and torch.equal(result.y_pred, predicted)
    assert result.y_true.dtype == result.y_pred.dtype == torch.int64
    # cross-entropy of logits (2, 0, 0, 0): right class -log(e^2/(e^2+3)), wrong -log(1/(e^2+3))
    right, wrong = -math.log(math.e ** 2 / (math.e ** 2 + 3)), math.log(math.e ** 2 + 3)
    assert result.loss == pytest.approx((4 * right + 3 * wrong) / 7)
    assert model.training == start_in_training_mode


def test_train_keeps_the_state_of_an_optimizer_it_is_given():
    model = model_class(MNIST_MODEL)()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = make_loader(random_images(40, (1, 28, 28)), batch_size=10, shuffle=True, seed=1)

    train(model, loader, epochs=1, learning_rate=1e-3, optimizer=optimizer)
    first_weight = next(model.parameters())
    moment_after_round_1 = optimizer.state[first_weight]["exp_avg"].clone()
    train(model, loader, epochs=1, learning_rate=1e-3, optimizer=optimizer)

    assert optimizer.state[first_weight]["step"].item() == 8  # 4 batches per round, 2 rounds
    assert not torch.equal(optimizer.state[first_weight]["exp_avg"], moment_after_round_1)


def test_train_changes_the_weights_and_reports_last_epoch_metrics():
    model = model_class(MNIST_MODEL)()
    before = [p.detach().clone() for p in model.parameters()]
    metrics = train(model, make_loader(random_images(30, (1, 28, 28)), 16, shuffle=False), 2, 1e-3)
    assert set(metrics) == {"loss", "accuracy"}
    assert math.isfinite(metrics["loss"]) and 0 <= metrics["accuracy"] <= 1
    assert all(not torch.equal(b, a) for b, a in zip(before, model.parameters()))


def test_train_runs_the_model_through_forward_quant(monkeypatch):
    import training.loop
    calls = []

    def spy(model, data):
        calls.append(tuple(data.shape))
        return model(data)

    monkeypatch.setattr(training.loop, "forward_quant", spy)
    train(model_class(MNIST_MODEL)(), make_loader(random_images(12, (1, 28, 28)), 5, False), 1, 1e-3)
    assert calls == [(5, 1, 28, 28), (5, 1, 28, 28), (2, 1, 28, 28)]


def test_same_seed_same_result_and_seeded_loader_order():
    def run(seed):
        seed_everything(seed)
        model = model_class(MNIST_MODEL)()
        train(model, make_loader(random_images(20, (1, 28, 28)), 8, shuffle=True, seed=seed), 1, 1e-3)
        return torch.cat([p.flatten() for p in model.parameters()])

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))

    def order(seed):
        dataset = TensorDataset(torch.arange(50).float(), torch.arange(50))
        return torch.cat([labels for _, labels in make_loader(dataset, 7, shuffle=True, seed=seed)]).tolist()

    assert order(5) == order(5) and order(5) != order(6) and sorted(order(5)) == list(range(50))


def test_cifar_net_builds_outputs_ten_scores_and_learns_a_fixed_batch():
    seed_everything(0)
    model = model_class(CIFAR_MODEL)()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    data = random_images(16, (3, 32, 32))
    loader = make_loader(data, 16, shuffle=False)
    loss_before = evaluate(model, loader).loss
    train(model, loader, epochs=5, learning_rate=1e-2)
    assert evaluate(model, loader).loss < loss_before


def test_evaluate_runs_an_int8_model_and_agrees_with_its_float_original():
    import quant
    seed_everything(0)
    model = model_class(MNIST_MODEL)()
    train(model, make_loader(client_1("train"), 32, shuffle=True, seed=0), 1, 2e-3)
    prepared = quant.prepare_ptq(model, (torch.rand(2, 1, 28, 28),), "x86")
    quant.calibrate(prepared, make_loader(client_1("train"), 64, shuffle=False), num_batches=4)
    int8_model = quant.convert(prepared)
    test_loader = make_loader(client_1("test"), 100, shuffle=False)

    float_result, int8_result = evaluate(model, test_loader), evaluate(int8_model, test_loader)
    assert int8_result.n == 334 and int8_result.y_pred.dtype == torch.int64
    assert (int8_result.y_pred == float_result.y_pred).float().mean() > 0.95
    assert abs(int8_result.accuracy - float_result.accuracy) < 0.05
