"""TRPO on a GPU: one large-policy update (one CPU thread vs the GPU) and the whole loop on TorchCartPole.

    python benchmarks/gpu_update.py                 # needs CUDA; skips cleanly (exit 0) without it
    python benchmarks/gpu_update.py --tiny          # the CPU half at a tiny size (what CI runs)
    python benchmarks/gpu_update.py --out benchmarks/results/gpu_update.jsonl

Part 1, the update: TRPO's update of an MLP policy with ``--hidden`` x ``--layers`` hidden units
(default 3 x 1024, about 2.1M actor parameters on HalfCheetah-sized spaces) on a batch of
``--batch`` samples (default 65,536): 10 CG iterations, the batched line search, one critic
epoch of Adam on minibatches of ``--critic-batch``. It runs on one CPU thread (the host path,
``sync_free`` off) and on the GPU (``sync_free`` on: no host synchronisation inside the
update), each variant timed as the median of ``--repeats`` updates after a warm-up. On the GPU
it is also run with the critic network compiled (``torch.compile``, mode
``"reduce-overhead"``, which replays CUDA graphs): the critic fit is hundreds of small steps,
the launch-bound part. The actor is not compiled: the Fisher-vector product differentiates
twice, which compiled graphs do not support.

Part 2, the loop: ``agent.learn`` on :class:`~trpo_lab.envs.torch_cartpole.TorchCartPole`
with ``--envs`` environments (default 4,096) on the GPU, rollouts and updates included, in
env-steps per second, with and without the compiled critic.

Targets (issue 16): the update >= 20x faster on an H200 than on one CPU thread; the loop
>= 1,000,000 env-steps/s. A variant that fails (e.g. a torch.compile limitation) is reported
with its error and the others still run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _synthetic import SyntheticControl, synthetic_batch  # noqa: E402

from trpo_lab.agents.trpo import TRPO  # noqa: E402
from trpo_lab.envs.torch_cartpole import TorchCartPole  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _compile_critic(agent: TRPO) -> None:
    agent.policy.critic.compile(mode="reduce-overhead")


def update_seconds(
    device: str, args: argparse.Namespace, sync_free: bool, repeats: int, prepare: Callable[[TRPO], None] | None
) -> tuple[float, int]:
    """Median seconds of one TRPO update (after one warm-up update) and the actor's parameter count."""
    agent = TRPO(
        SyntheticControl, n_envs=1, seed=0, device=device, n_steps=8, cg_max_steps=10, n_critic_updates=1,
        batch_size=args.critic_batch, policy_kwargs={"net_arch": [args.hidden] * args.layers},
        sync_free=sync_free,
    )
    if prepare is not None:
        prepare(agent)
    n_params = sum(p.numel() for p in agent.policy.actor_parameters())
    batch = synthetic_batch(args.batch, device)
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        agent.update(batch)
        _sync(device)
        times.append(time.perf_counter() - start)
    agent.close()
    return statistics.median(times[1:]), n_params


def loop_steps_per_second(device: str, args: argparse.Namespace, prepare: Callable[[TRPO], None] | None) -> float:
    """Env-steps per second of ``learn`` on TorchCartPole (rollouts and updates), after one warm-up update."""
    agent = TRPO(
        TorchCartPole(args.envs, device=device), device=device, seed=0, n_steps=args.loop_steps,
        batch_size=args.critic_batch, n_critic_updates=1, sync_free=True,
    )
    if prepare is not None:
        prepare(agent)
    per_update = args.envs * args.loop_steps
    agent.learn(per_update)  # warm-up: allocations, kernels, compilation
    _sync(device)
    start = time.perf_counter()
    agent.learn(per_update * args.loop_updates)
    _sync(device)
    elapsed = time.perf_counter() - start
    steps = per_update * args.loop_updates
    agent.close()
    return steps / elapsed


def _attempt(name: str, run: Callable[[], Any]) -> Any:
    try:
        return run()
    except Exception as exc:  # a variant that cannot run here is reported, not fatal
        print(f"  {name}: failed ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})")
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=65_536, help="samples per update (default 65536)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden units per layer (default 1024)")
    parser.add_argument("--layers", type=int, default=3, help="hidden layers (default 3)")
    parser.add_argument("--critic-batch", type=int, default=4096, help="critic minibatch size (default 4096)")
    parser.add_argument("--repeats", type=int, default=5, help="timed GPU updates (default 5)")
    parser.add_argument("--cpu-repeats", type=int, default=1, help="timed one-thread CPU updates (default 1)")
    parser.add_argument("--envs", type=int, default=4096, help="TorchCartPole environments (default 4096)")
    parser.add_argument("--loop-steps", type=int, default=32, help="n_steps of the loop benchmark (default 32)")
    parser.add_argument("--loop-updates", type=int, default=10, help="timed updates of the loop (default 10)")
    parser.add_argument("--tiny", action="store_true", help="only the CPU half, at a tiny size (a smoke test)")
    parser.add_argument("--out", type=Path, help="append the results as one JSON line to this file")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.hidden, args.critic_batch, args.envs, args.loop_steps = 512, 32, 256, 64, 8
        args.repeats = args.cpu_repeats = 1
    elif not torch.cuda.is_available():
        print("gpu_update: CUDA is not available on this machine; the GPU benchmark is skipped "
              "(run with --tiny for the CPU half at a tiny size)")
        return 0
    results: dict[str, Any] = {"batch": args.batch, "hidden": [args.hidden] * args.layers, "envs": args.envs}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cpu_s, n_params = update_seconds("cpu", args, sync_free=False, repeats=args.cpu_repeats, prepare=None)
    torch.set_num_threads(threads)
    results.update(actor_parameters=n_params, cpu_1thread_update_s=cpu_s)
    print(f"TRPO update: actor {n_params:,} parameters, batch {args.batch:,}, 10 CG iterations, one critic epoch")
    print(f"  cpu, 1 thread, host path         {cpu_s:9.3f} s")
    if args.tiny:
        sync_free_s, _ = update_seconds("cpu", args, sync_free=True, repeats=1, prepare=None)
        print(f"  cpu, sync_free path              {sync_free_s:9.3f} s")
        sps = loop_steps_per_second("cpu", args, prepare=None)
        print(f"TorchCartPole loop on the cpu, {args.envs} envs: {sps:,.0f} env-steps/s")
        results.update(cpu_sync_free_update_s=sync_free_s, cpu_loop_steps_per_s=sps)
    else:
        name = torch.cuda.get_device_name()
        results["gpu"] = name
        for label, prepare in (("eager", None), ("compiled critic", _compile_critic)):
            timed = _attempt(label, lambda prepare=prepare: update_seconds("cuda", args, True, args.repeats, prepare))
            if timed is not None:
                print(f"  gpu ({name}), {label:16s} {timed[0]:9.3f} s   speed-up over 1 cpu thread {cpu_s / timed[0]:6.1f}x")
                results[f"gpu_update_s[{label}]"] = timed[0]
        print(f"TorchCartPole loop, {args.envs:,} envs, n_steps {args.loop_steps}, updates included:")
        for label, prepare in (("eager", None), ("compiled critic", _compile_critic)):
            sps = _attempt(label, lambda prepare=prepare: loop_steps_per_second("cuda", args, prepare))
            if sps is not None:
                print(f"  gpu, {label:16s} {sps:14,.0f} env-steps/s")
                results[f"gpu_loop_steps_per_s[{label}]"] = sps
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as fh:
            fh.write(json.dumps(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
