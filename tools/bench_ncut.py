"""Soft N-cut loss: time and peak memory of forward + backward, exact (segjobs) vs. the dense HW x HW version.

    .venv/bin/python tools/bench_ncut.py                 # CPU; add --device cuda on a GPU machine

Cases: the exact loss at B=8, K=20, 224x224, r=5 (the size the paper trains at); and both implementations
at 64x64, where the dense affinity matrix still fits (224x224 would need 8 x 50176^2 floats = 80 GB).
Each case runs in its own process: memory is the peak above what the inputs occupy (peak RSS on CPU,
max_memory_allocated on CUDA); time is the median of --repeats runs after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from models.wnet import dense_soft_ncut_loss, soft_ncut_loss

CASES = [("exact", 8, 20, 224), ("exact", 8, 20, 64), ("dense", 8, 20, 64)]


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_case(impl: str, batch: int, k: int, size: int, device: str, repeats: int) -> dict:
    loss_fn = soft_ncut_loss if impl == "exact" else dense_soft_ncut_loss
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, k, size, size, generator=generator).to(device)
    image = (torch.rand(batch, 3, size, size, generator=generator) * 255).to(device)

    def step():
        probs = logits.detach().requires_grad_().softmax(dim=1)
        loss_fn(probs, image, radius=5).backward()

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = current_rss_mib()
    step()  # warm-up, and the memory peak
    if device == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return {"ms": statistics.median(times), "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # impl,B,K,size: run one case in this process
    args = parser.parse_args()
    if args.case:
        impl, batch, k, size = args.case.split(",")
        print(json.dumps(run_case(impl, int(batch), int(k), int(size), args.device, args.repeats)))
        return

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"soft N-cut forward + backward, r=5, on {device_name}, median of {args.repeats}")
    print(f"{'impl':6} {'B':>2} {'K':>3} {'size':>8} {'ms':>10} {'peak MiB':>10}  {'B*K*H*W floats MiB':>18}")
    results = {}
    for impl, batch, k, size in CASES:
        out = subprocess.run([sys.executable, __file__, "--device", args.device, "--repeats", str(args.repeats),
                              "--case", f"{impl},{batch},{k},{size}"], capture_output=True, text=True, check=True)
        result = results[(impl, size)] = json.loads(out.stdout)
        unit = batch * k * size * size * 4 / 2**20
        print(f"{impl:6} {batch:2} {k:3} {size:>4}x{size:<3} {result['ms']:10.1f} {result['peak_mib']:10.1f}  {unit:18.1f}")
    exact, dense = results[("exact", 64)], results[("dense", 64)]
    print(f"at 64x64 the exact loss takes {dense['ms'] / exact['ms']:.1f}x less time and "
          f"{dense['peak_mib'] / max(exact['peak_mib'], 1e-9):.1f}x less memory than the dense one")


if __name__ == "__main__":
    main()
