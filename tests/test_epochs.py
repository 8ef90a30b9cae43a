"""epochs below 1: each round trains on the next slice of an endless stream of epochs."""
import torch
from torch.utils.data import DataLoader, TensorDataset

from inputs.config import parse_config
from inputs.errors import InputError
from training.epochs import RoundBatches
from training.local import LocalTraining

import pytest

BASE = {"model": "m.py", "train_dataset": "t.pth", "test_dataset": "v.pth"}


def numbered_loader(n=10, batch_size=2, shuffle=False):
    data = TensorDataset(torch.arange(n).float().unsqueeze(1), torch.zeros(n, dtype=torch.long))
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle)


def seen(loader):
    return [int(x) for inputs, _ in loader for x in inputs.flatten()]


def test_whole_epochs_hand_over_the_loader_itself():
    loader = numbered_loader()
    assert RoundBatches(loader, 2).for_round() == (loader, 2)
    assert RoundBatches(loader, 3.0).for_round() == (loader, 3)


def test_half_epochs_cover_the_data_once_every_two_rounds():
    rounds = RoundBatches(numbered_loader(), 0.5)  # 5 batches per epoch: round(2.5) = 2 per round
    first, epochs = rounds.for_round()
    assert epochs == 1 and len(first) == 2
    assert seen(first) == [0, 1, 2, 3]
    assert seen(rounds.for_round()[0]) == [4, 5, 6, 7]
    assert seen(rounds.for_round()[0]) == [8, 9, 0, 1]  # the next epoch starts where this one ends


def test_a_slice_reads_through_to_the_loader_and_reshuffles_each_epoch():
    torch.manual_seed(0)
    loader = numbered_loader(n=8, batch_size=1, shuffle=True)
    rounds = RoundBatches(loader, 0.5)
    slice_ = rounds.for_round()[0]
    assert slice_.dataset is loader.dataset and slice_.batch_size == 1
    epoch_one = seen(slice_) + seen(rounds.for_round()[0])
    epoch_two = seen(rounds.for_round()[0]) + seen(rounds.for_round()[0])
    assert sorted(epoch_one) == sorted(epoch_two) == list(range(8))
    assert epoch_one != epoch_two


def test_local_training_takes_a_fraction_of_the_steps_per_round():
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 2)
    steps = []
    def train(model, train_loader, epochs, learning_rate):
        steps.append(sum(1 for _ in range(epochs) for _ in train_loader))
    local = LocalTraining(model, numbered_loader(n=40, batch_size=4), train, epochs=0.25, learning_rate=0.1)
    local.train_round()
    local.train_round()
    assert steps == [2, 2]  # 10 batches per epoch: a quarter is 2 (rounded), every round


def test_config_accepts_a_fraction_and_refuses_zero():
    assert parse_config({**BASE, "epochs": 0.5}).epochs == 0.5
    with pytest.raises(InputError, match="epochs"):
        parse_config({**BASE, "epochs": 0})



def test_a_federation_with_half_epochs_trains_every_sample_once_in_two_rounds(tmp_path):
    """Through the app's Site and Coordinator (bench.simulate): with epochs 0.5 each round's
    training sees half of a site's batches, and two rounds see each training sample once."""
    from bench.simulate import load_sites, run_rounds
    from tests.privacy_helpers import make_tiny_federation
    from training import train

    clients, generic = make_tiny_federation(tmp_path, epochs=0.5, max_iter=2, validation_fraction=0,
                                            aggregation="fedavg")
    sites = load_sites(clients, generic)
    trained = {index: [] for index in range(len(sites))}
    for index, site in enumerate(sites):
        def recording(model, train_loader, epochs, learning_rate, optimizer=None, device="cpu",
                      _seen=trained[index]):
            batches = list(train_loader)
            _seen.append(torch.cat([inputs.flatten(1) for inputs, _ in batches]))
            return train(model, batches, epochs, learning_rate, optimizer=optimizer, device=device)
        site.local.train_function = recording

    assert len(run_rounds(sites)["rounds"]) == 2
    for index, site in enumerate(sites):
        first, second = trained[index]
        n_train = site.inputs.train_info.n
        assert abs(len(first) - n_train / 2) <= site.config.batch_size  # half of the batches
        both = torch.cat([first, second])
        assert len(both) == n_train and len(torch.unique(both, dim=0)) == n_train  # each sample once
