"""fp32 vs int8 on the bundled sample: accuracy per quantization type and backend, size, latency.

    python -m bench.quantization [--seeds N] [--out bench/results/quantization.json]
    python -m bench.quantization --quick      # the deployable files only, 1 seed (a few minutes)

Accuracy: the sample federation (3 sites, its config) through bench.simulate, mean over seeds.
Size and latency: the sample's LeNet and a wider CNN (4 convolutions of 32-128 channels on
32x32 inputs), post-training quantized on random data; one thread, median milliseconds.

Deployable files (`artifact_rows`): LeNet and the wide CNN (on the sample's digits padded to
32x32 and repeated on 3 channels) trained centrally on the pooled sample, then post_static
(32 calibration batches of 32) or qat (one epoch of fine-tuning at lr 1e-4, observers and
BatchNorm frozen for its second half) with FX x86 (TorchScript .pt) and xnnpack (PT2E:
.pt2 reference, ExecuTorch .pte, ONNX Runtime .onnx). Every file is measured in its own
runtime (quant.measure_artifact) on the pooled test sets (1,000 digits): accuracy, size,
median latency at batch 1, 32 and 256 on one thread; fp32 eager in the same run.
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import quant
from bench.simulate import SAMPLE_CLIENTS, SAMPLE_GENERIC, simulate
from inputs.model_file import load_model

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "quantization.json"
BATCH_SIZE = 32  # the sample config's batch_size


class WideCNN(nn.Module):
    """4 conv-bn-relu layers of 32-128 channels on 3x32x32 inputs."""

    def __init__(self, n_classes=10):
        super().__init__()
        layers, channels = [], [3, 32, 64, 96, 128]
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(128 * 2 * 2, n_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def accuracy_rows(seeds):
    rows = []
    for quant_type in quant.QUANT_TYPES:
        for backend in quant.FX_BACKENDS:
            runs = [simulate(SAMPLE_CLIENTS, SAMPLE_GENERIC,
                             {"quant_type": quant_type, "backend": backend, "seed": seed}, quantize=True)
                    for seed in range(1, seeds + 1)]
            fp32 = [run["fp32_accuracy"] for run in runs]
            int8 = [run["int8_accuracy"] for run in runs]
            rows.append({"quant_type": quant_type, "backend": backend, "seeds": seeds,
                         "fp32_accuracy": statistics.mean(fp32), "int8_accuracy": statistics.mean(int8),
                         "int8_minus_fp32_points": 100 * (statistics.mean(int8) - statistics.mean(fp32)),
                         "fp32_per_seed": fp32, "int8_per_seed": int8})
            print(f"  {quant_type:11s} {backend:7s} fp32 {rows[-1]['fp32_accuracy']:.4f} "
                  f"int8 {rows[-1]['int8_accuracy']:.4f}", flush=True)
    return rows


def speed_rows():
    models = {"mnist_lenet": (load_model(SAMPLE_GENERIC / "mnist_model.py"), (1, 28, 28)),
              "wide_cnn": (WideCNN(), (3, 32, 32))}
    rows = []
    generator = torch.Generator().manual_seed(0)
    for name, (model, shape) in models.items():
        model.eval()
        batches = [torch.rand((BATCH_SIZE, *shape), generator=generator) for _ in range(8)]
        fp32 = {"size_bytes": quant.state_dict_size_bytes(model),
                "latency_ms_batch_1": quant.latency_ms(model, batches[0][:1]),
                f"latency_ms_batch_{BATCH_SIZE}": quant.latency_ms(model, batches[0])}
        for backend in quant.FX_BACKENDS:
            prepared = quant.prepare_ptq(model, (batches[0][:1],), backend)
            quant.calibrate(prepared, batches, len(batches))
            int8_model = quant.convert(prepared)  # selects the backend's kernels
            int8 = {"size_bytes": quant.state_dict_size_bytes(int8_model),
                    "latency_ms_batch_1": quant.latency_ms(int8_model, batches[0][:1]),
                    f"latency_ms_batch_{BATCH_SIZE}": quant.latency_ms(int8_model, batches[0])}
            rows.append({"model": name, "backend": backend, "fp32": fp32, "int8": int8,
                         "size_ratio": fp32["size_bytes"] / int8["size_bytes"],
                         "speedup_batch_1": fp32["latency_ms_batch_1"] / int8["latency_ms_batch_1"],
                         f"speedup_batch_{BATCH_SIZE}": fp32[f"latency_ms_batch_{BATCH_SIZE}"]
                         / int8[f"latency_ms_batch_{BATCH_SIZE}"]})
    return rows


ARTIFACT_BATCHES = (1, 32, 256)


def _pooled(split):
    parts = [torch.load(client / f"{split}_dataset.pth", weights_only=True) for client in SAMPLE_CLIENTS]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def _as_rgb32(images):
    """1x28x28 digits as 3x32x32 images (zero border, channel repeated) for the wide CNN."""
    return nn.functional.pad(images, (2, 2, 2, 2)).repeat(1, 3, 1, 1)


def _train(model, inputs, labels, epochs, lr, seed, forward=None, on_step=None):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    forward = forward or (lambda batch: model(batch))
    model.train()
    steps = epochs * ((len(inputs) + 63) // 64)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), 64):
            if on_step:
                on_step(step, steps)
            index = order[start:start + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(forward(inputs[index]), labels[index]).backward()
            optimizer.step()
            step += 1
    model.eval()
    return model


def _measure_fp32(model, test, repeats):
    inputs, labels = test
    threads = torch.get_num_threads()
    with torch.no_grad():
        accuracy = (model(inputs).argmax(1) == labels).float().mean().item()
    latency = {size: quant.latency_ms(model, inputs[:size], repeats=repeats) for size in ARTIFACT_BATCHES}
    torch.set_num_threads(threads)
    return {"accuracy": accuracy, "size_bytes": quant.state_dict_size_bytes(model), "latency_ms": latency}


def _int8_model(model, backend, quant_type, train, test_example, seed):
    inputs, labels = train
    example = (test_example,)
    if quant_type == "post_static":
        prepared = quant.prepare_ptq(model, example, backend)
        quant.calibrate(prepared, [inputs[i:i + 32] for i in range(0, 32 * 32, 32)], 32)
    else:
        prepared = quant.prepare_qat(model, example, backend)

        def schedule(step, steps):
            if step == steps // 2:
                quant.freeze_qat(prepared, observers=True, batchnorm=True)

        _train(prepared, inputs, labels, epochs=1, lr=1e-4, seed=seed,
               forward=lambda batch: quant.forward_quant(prepared, batch), on_step=schedule)
    return quant.convert(prepared)


def artifact_rows(seeds, repeats=10):
    """fp32, FX x86 (.pt) and xnnpack (.pt2, .pte, .onnx), each file in its own runtime."""
    train, test = _pooled("train"), _pooled("test")
    models = {"mnist_lenet": (lambda: load_model(SAMPLE_GENERIC / "mnist_model.py"), lambda x: x, 3),
              "wide_cnn": (WideCNN, _as_rgb32, 2)}
    rows = []
    for name, (make, shape, epochs) in models.items():
        train_x, test_x = shape(train[0]), shape(test[0])
        for seed in range(1, seeds + 1):
            torch.manual_seed(seed)
            started = time.time()
            model = _train(make(), train_x, train[1], epochs=epochs, lr=0.002, seed=seed)
            fp32 = _measure_fp32(model, (test_x, test[1]), repeats)
            print(f"  {name} seed {seed}: fp32 {fp32['accuracy']:.4f} ({time.time() - started:.0f} s)", flush=True)
            for quant_type in quant.QUANT_TYPES:
                for backend in ("x86", "xnnpack"):
                    started = time.time()
                    int8_model = _int8_model(model, backend, quant_type, (train_x, train[1]), test_x[:1], seed)
                    with tempfile.TemporaryDirectory() as out_dir:
                        paths = quant.write_artifacts(int8_model, (test_x[:1],), out_dir, backend)
                        loader = [(test_x[i:i + 100], test[1][i:i + 100]) for i in range(0, len(test_x), 100)]
                        for kind, path in paths.items():
                            figures = quant.measure_artifact(path, loader, ARTIFACT_BATCHES, repeats=repeats,
                                                             backend=backend)
                            rows.append({"model": name, "seed": seed, "quant_type": quant_type, "backend": backend,
                                         "file": path.name, "fp32": fp32, **figures})
                            print(f"  {name} {quant_type:11s} {backend:7s} {path.name:16s} "
                                  f"acc {figures['accuracy']:.4f} {figures['size_bytes'] / 1024:6.1f} KB "
                                  f"b32 {figures['latency_ms'][32]:.2f} ms", flush=True)
                    print(f"    ({time.time() - started:.0f} s)", flush=True)
    return rows


def _mean(values):
    return statistics.mean(values) if values else float("nan")


def format_artifact_table(rows):
    """Mean over seeds per model, quant_type, backend and file, with fp32 in the same run."""
    groups = {}
    for row in rows:
        groups.setdefault((row["model"], row["quant_type"], row["backend"], row["file"]), []).append(row)
    lines = ["| model | quant_type | file (runtime) | accuracy (fp32) | size KB (fp32) "
             "| ms batch 1 / 32 / 256 (fp32) |", "|---|---|---|---|---|---|"]
    runtime = {".pt": "TorchScript x86", ".pt2": "torch.export", ".pte": "ExecuTorch XNNPACK",
               ".onnx": "onnxruntime"}
    for (model, quant_type, backend, file), group in groups.items():
        suffix = Path(file).suffix
        fp32 = [g["fp32"] for g in group]
        latency = " / ".join(f"{_mean([g['latency_ms'][b] for g in group]):.2f}" for b in ARTIFACT_BATCHES)
        fp32_latency = " / ".join(f"{_mean([f['latency_ms'][b] for f in fp32]):.2f}" for b in ARTIFACT_BATCHES)
        lines.append(
            f"| {model} | {quant_type} | {file} ({runtime[suffix]}) "
            f"| {_mean([g['accuracy'] for g in group]):.4f} ({_mean([f['accuracy'] for f in fp32]):.4f}) "
            f"| {_mean([g['size_bytes'] for g in group]) / 1024:.1f} ({_mean([f['size_bytes'] for f in fp32]) / 1024:.0f}) "
            f"| {latency} ({fp32_latency}) |")
    return "\n".join(lines)


def format_tables(accuracy, speed):
    lines = ["| quant_type | backend | fp32 accuracy | int8 accuracy | int8 - fp32 (points) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['quant_type']} | {r['backend']} | {r['fp32_accuracy']:.4f} | {r['int8_accuracy']:.4f} "
              f"| {r['int8_minus_fp32_points']:+.2f} |" for r in accuracy]
    big = f"latency_ms_batch_{BATCH_SIZE}"
    lines += ["", f"| model | backend | size fp32 -> int8 (KB) | ratio | batch 1 fp32 / int8 (ms) "
              f"| batch {BATCH_SIZE} fp32 / int8 (ms) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['backend']} | {r['fp32']['size_bytes'] / 1024:.0f} -> "
              f"{r['int8']['size_bytes'] / 1024:.0f} | {r['size_ratio']:.1f}x "
              f"| {r['fp32']['latency_ms_batch_1']:.3f} / {r['int8']['latency_ms_batch_1']:.3f} "
              f"| {r['fp32'][big]:.2f} / {r['int8'][big]:.2f} |" for r in speed]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per accuracy figure (default 3)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    parser.add_argument("--quick", action="store_true",
                        help="only the deployable files (artifact rows), 1 seed unless --seeds is given")
    args = parser.parse_args(argv)
    seeds = args.seeds
    accuracy, speed = [], []
    if args.quick:
        if "--seeds" not in (argv if argv is not None else __import__("sys").argv):
            seeds = 1
    else:
        print("accuracy on the sample federation (mean over seeds):", flush=True)
        accuracy = accuracy_rows(seeds)
        speed = speed_rows()
        print(format_tables(accuracy, speed))
    print(f"deployable files, each in its own runtime ({seeds} seed(s)):", flush=True)
    artifacts = artifact_rows(seeds)
    print(format_artifact_table(artifacts))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"accuracy": accuracy, "speed": speed, "artifacts": artifacts,
                                    "torch": torch.__version__, "threads": 1}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
