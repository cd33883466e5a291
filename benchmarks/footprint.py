"""Memory footprint: bytes per dataset and dtype, and the measured peak RSS of a filled memory.

Usage:
    python benchmarks/footprint.py [--smoke] [--json PATH]

The table of bytes is the static estimate (``MemoryWrapper.estimate_nbytes``). The measured part
allocates a CIFAR-10-sized memory (50,000 x 3x32x32) in each dtype in a fresh subprocess,
fills every row through ``MemoryWrapper`` calls with batches of 128 (as training does), and
compares the growth of the peak resident set size with ``memory.nbytes``.

The fill loop's batch-sized temporaries (encoded rows, masks, the staging of a write) also raise the
peak. They are measured first in the same process, by filling a one-batch memory with the same
loop; "net" subtracts that baseline (less the one-batch memory itself) from the growth.
``--smoke`` measures a 2,000-row memory instead (for tests).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import resource
import subprocess
import sys
import time

import torch

from memloss_addon import MemoryWrapper

DATASETS = {
    "CIFAR-10/100 (50k, 3x32x32)": (50_000, (3, 32, 32)),
    "SVHN (73,257, 3x32x32)": (73_257, (3, 32, 32)),
    "TinyImageNet (100k, 3x64x64)": (100_000, (3, 64, 64)),
    "ImageNet-1k (1,281,167, 3x224x224)": (1_281_167, (3, 224, 224)),
}
DTYPES = {
    "float32": (torch.float32, "example"),
    "float16": (torch.float16, "example"),
    "bfloat16": (torch.bfloat16, "example"),
    "uint8": (torch.uint8, "example"),
    "int8 (perturbation)": (torch.int8, "perturbation"),
}
EPS = 8 / 255


def peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fill(memory: MemoryWrapper, batch_tensors: tuple[torch.Tensor, ...], batch: int) -> None:
    """Writes every row of ``memory`` with calls of ``batch`` rows, as an epoch of training does."""
    clean, adv, logits, targets = batch_tensors
    num_samples = memory.num_samples
    for first in range(0, num_samples, batch):
        rows = min(batch, num_samples - first)
        memory(
            torch.arange(first, first + rows),
            clean[:rows],
            adv[:rows],
            logits[:rows],
            targets[:rows],
        )


def measure_one(dtype_name: str, num_samples: int, batch: int = 128) -> dict:
    """Runs in a fresh process: peak RSS growth of allocating and filling one memory."""
    dtype, mode = DTYPES[dtype_name]
    shape = (3, 32, 32)
    clean = torch.rand(batch, *shape)
    adv = (clean + EPS * torch.rand_like(clean).sign()).clamp(0, 1)
    logits = torch.zeros(batch, 10)
    targets = torch.zeros(batch, dtype=torch.long)
    model = torch.nn.Identity()
    tensors = (clean, adv, logits, targets)
    options = {"beta_prime": 0.0, "dtype": dtype, "mode": mode, "eps": EPS}
    baseline = peak_rss_bytes()
    # The loop's temporaries alone: the same calls on a one-batch memory (twice, to settle).
    small = MemoryWrapper(model, batch, shape, **options)
    fill(small, tensors, batch)
    fill(small, tensors, batch)
    temporaries = max(0, peak_rss_bytes() - baseline - small.nbytes)
    start = time.perf_counter()
    memory = MemoryWrapper(model, num_samples, shape, **options)
    fill(memory, tensors, batch)
    seconds = time.perf_counter() - start
    grown = peak_rss_bytes() - baseline - small.nbytes
    assert memory.stats()["filled_fraction"] == 1.0
    return {
        "dtype": dtype_name,
        "num_samples": num_samples,
        "batch": batch,
        "nbytes": memory.nbytes,
        "peak_rss_growth": grown,
        "ratio": grown / memory.nbytes,
        "batch_temporaries": temporaries,
        "net_growth": grown - temporaries,
        "net_ratio": (grown - temporaries) / memory.nbytes,
        "fill_seconds": seconds,
    }


def measure_in_subprocess(dtype_name: str, num_samples: int) -> dict:
    here = pathlib.Path(__file__).parent
    code = (
        f"import json, sys; sys.path.insert(0, {str(here)!r}); import footprint; "
        f"print(json.dumps(footprint.measure_one({dtype_name!r}, {num_samples})))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="measure a 2,000-row memory only")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)

    print("Static size of the memory (depth 1), MB = 1e6 bytes")
    header = f"{'dataset':38s}" + "".join(f"{name:>22s}" for name in DTYPES)
    print(header)
    static = {}
    for dataset, (n, shape) in DATASETS.items():
        sizes = {
            name: MemoryWrapper.estimate_nbytes(n, shape, dtype=dt)
            for name, (dt, _) in DTYPES.items()
        }
        static[dataset] = sizes
        print(f"{dataset:38s}" + "".join(f"{s / 1e6:>20.1f}MB" for s in sizes.values()))

    num_samples = 2_000 if args.smoke else 50_000
    print(
        f"\nMeasured: allocate and fill {num_samples:,} x 3x32x32 with batches of 128 "
        "(fresh process per dtype); net = growth - the fill loop's measured batch temporaries"
    )
    print(
        f"{'dtype':22s}{'nbytes':>16s}{'peak RSS growth':>18s}{'ratio':>8s}"
        f"{'temporaries':>14s}{'net ratio':>10s}{'fill s':>9s}  within 10%"
    )
    measured = []
    for name in DTYPES:
        row = measure_in_subprocess(name, num_samples)
        measured.append(row)
        print(
            f"{name:22s}{row['nbytes']:>16,d}{row['peak_rss_growth']:>18,d}"
            f"{row['ratio']:>8.3f}{row['batch_temporaries']:>14,d}{row['net_ratio']:>10.3f}"
            f"{row['fill_seconds']:>9.2f}  "
            f"raw {'yes' if row['ratio'] <= 1.10 else 'no'}, "
            f"net {'yes' if abs(row['net_ratio'] - 1) <= 0.10 else 'no'}"
        )
    result = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "static_bytes": static,
        "measured": measured,
    }
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
