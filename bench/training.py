"""Local training cost: the sample's LeNet, 2 epochs on client_1's 1,333 digits, one thread.

    python -m bench.training [--repeats N] [--out bench/results/training.json]

The default train loop (`training.train`, Adam, learning rate 2e-3, batch size 8) from a fixed
seed, then evaluation on client_1's 334 test digits. CPU seconds (`time.process_time`, this
process only) and wall seconds per repeat, with their median; the test accuracy, which the same
seed makes the same on every repeat. Timing is a figure here, not a test: on a machine shared
with other processes it varies (tests/test_training.py checks what the run learns).
"""
import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from training import evaluate, make_loader, seed_everything, train

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "training.json"
MNIST_MODEL = ROOT / "data" / "sample" / "generic" / "mnist_model.py"
CLIENT_1 = ROOT / "data" / "sample" / "client_1"
EPOCHS, BATCH_SIZE, LEARNING_RATE = 2, 8, 2e-3


def _client_1(split):
    return TensorDataset(*torch.load(CLIENT_1 / f"{split}_dataset.pth", weights_only=True))


def _lenet():
    spec = importlib.util.spec_from_file_location("bench_mnist_model", MNIST_MODEL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Model()


def one_run(seed=0):
    """Train and evaluate once: {cpu_s, wall_s, train_loss, train_accuracy, test_accuracy}."""
    seed_everything(seed)
    model = _lenet()
    train_set, test_set = _client_1("train"), _client_1("test")
    cpu_started, wall_started = time.process_time(), time.perf_counter()
    metrics = train(model, make_loader(train_set, batch_size=BATCH_SIZE, shuffle=True, seed=seed),
                    epochs=EPOCHS, learning_rate=LEARNING_RATE)
    result = evaluate(model, make_loader(test_set, batch_size=256, shuffle=False))
    return {"cpu_s": time.process_time() - cpu_started, "wall_s": time.perf_counter() - wall_started,
            "train_loss": metrics["loss"], "train_accuracy": metrics["accuracy"],
            "test_accuracy": result.accuracy, "n_train": len(train_set), "n_test": result.n}


def run(repeats=3):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches run fastest on one thread
    try:
        runs = [one_run() for _ in range(repeats)]
    finally:
        torch.set_num_threads(threads)
    return {"model": "mnist_lenet", "epochs": EPOCHS, "batch_size": BATCH_SIZE, "threads": 1,
            "n_train": runs[0]["n_train"], "n_test": runs[0]["n_test"], "repeats": repeats,
            "cpu_s_median": statistics.median(r["cpu_s"] for r in runs),
            "wall_s_median": statistics.median(r["wall_s"] for r in runs),
            "test_accuracy": runs[0]["test_accuracy"], "runs": runs, "torch": torch.__version__}


def format_table(document):
    lines = ["| repeat | CPU s | wall s | train loss | test accuracy |", "|---|---|---|---|---|"]
    lines += [f"| {i} | {r['cpu_s']:.2f} | {r['wall_s']:.2f} | {r['train_loss']:.4f} "
              f"| {r['test_accuracy']:.4f} |" for i, r in enumerate(document["runs"], 1)]
    lines.append(f"| median | {document['cpu_s_median']:.2f} | {document['wall_s_median']:.2f} | | |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.training",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="training runs (default 3)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    args = parser.parse_args(argv)
    document = run(args.repeats)
    print(f"LeNet, {EPOCHS} epochs on {document['n_train']} digits (batch {BATCH_SIZE}, one thread):")
    print(format_table(document))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2))
    print(f"wrote {args.out}")
    return document


if __name__ == "__main__":
    main()
