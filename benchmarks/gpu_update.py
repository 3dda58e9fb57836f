"""One TRPO update for a ~1M-parameter policy on a 64k-sample batch: CPU vs GPU.

    python benchmarks/gpu_update.py [--batch 65536] [--hidden 1024] [--repeats 3]

Skips with a message when CUDA is not available.  The GPU run uses the batched,
synchronisation-free line search (``line_search_batched=True``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _synthetic import SyntheticControl, synthetic_batch  # noqa: E402

from trpo_lab.agents.trpo import TRPO  # noqa: E402


def time_update(device: str, batch_size: int, hidden: int, repeats: int, threads: int) -> tuple[float, int]:
    torch.set_num_threads(threads)
    agent = TRPO(
        SyntheticControl, n_envs=1, seed=0, device=device, n_steps=8, cg_max_steps=10, n_critic_updates=1,
        batch_size=batch_size, policy_kwargs={"net_arch": [hidden, hidden]}, line_search_batched=device != "cpu",
    )
    n_params = sum(p.numel() for p in agent.policy.actor_parameters())
    batch = synthetic_batch(batch_size, device)
    times = []
    for _ in range(repeats + 1):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        agent.update(batch)
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), n_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=65_536)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu-threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_update: CUDA is not available here; nothing to compare (skipped)")
        return
    gpu_s, n_params = time_update("cuda", args.batch, args.hidden, args.repeats, args.cpu_threads)
    cpu_s, _ = time_update("cpu", args.batch, args.hidden, args.repeats, args.cpu_threads)
    print(f"TRPO update, actor {n_params:,} parameters, batch {args.batch:,}, 10 CG iterations, 1 critic epoch")
    print(f"  cpu ({args.cpu_threads} threads) {cpu_s:8.3f} s")
    print(f"  gpu ({torch.cuda.get_device_name()}) {gpu_s:8.3f} s")
    print(f"  speed-up gpu / cpu = {cpu_s / gpu_s:.1f}x")


if __name__ == "__main__":
    main()
