"""fp32 vs int8 on the bundled sample: accuracy per quantization type and backend, size, latency.

    python -m bench.quantization [--seeds N] [--out bench/results/quantization.json]

Accuracy: the sample federation (3 sites, its config) through bench.simulate, mean over seeds.
Size and latency: the sample's LeNet and a wider CNN (4 convolutions of 32-128 channels on
32x32 inputs), post-training quantized on random data; one thread, median milliseconds.
"""
import argparse
import json
import statistics
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
        for backend in quant.BACKENDS:
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
        for backend in quant.BACKENDS:
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
    args = parser.parse_args(argv)
    print("accuracy on the sample federation (mean over seeds):", flush=True)
    accuracy = accuracy_rows(args.seeds)
    speed = speed_rows()
    print(format_tables(accuracy, speed))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"accuracy": accuracy, "speed": speed,
                                    "torch": torch.__version__, "threads": 1}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
