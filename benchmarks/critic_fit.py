"""TRPO's critic fit: the hand-written MLP gradient against autograd, in one process, interleaved.

``TrustRegionAgent.fit_critic`` takes a plain MLP critic's MSE gradient from
:func:`trpo_lab.nn.policy.mlp_mse_gradients` (the chain rule written out, tested equal to
autograd) instead of autograd. This times ``fit_critic`` on one rollout of each env's preset
agent, alternating the two paths (autograd: ``mlp_mse_gradients`` patched to decline), and
prints the medians and their ratio. One torch thread.

    python benchmarks/critic_fit.py --envs CartPole-v1 HalfCheetah-v5 Hopper-v5 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import trpo_lab.agents.trpo as trpo_module
from trpo_lab import TRPO


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["CartPole-v1", "HalfCheetah-v5"])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    by_hand = trpo_module.mlp_mse_gradients
    for env_id in args.envs:
        agent = TRPO.from_preset(env_id, seed=0)
        agent.collect_rollout()
        batch = agent.buffer.batch()
        times: dict[str, list[float]] = {"by hand": [], "autograd": []}
        try:
            for _ in range(args.repeats):
                for path in times:
                    trpo_module.mlp_mse_gradients = by_hand if path == "by hand" else (lambda *a, **k: None)
                    start = time.perf_counter()
                    agent.fit_critic(batch)
                    times[path].append(time.perf_counter() - start)
        finally:
            trpo_module.mlp_mse_gradients = by_hand
        median = {path: statistics.median(values) for path, values in times.items()}
        cfg = agent.config
        print(f"{env_id}: batch {batch.size}, minibatch {cfg.batch_size}, {cfg.n_critic_updates} epochs: fit_critic "
              f"median by hand {1e3 * median['by hand']:.0f} ms, autograd {1e3 * median['autograd']:.0f} ms, "
              f"autograd / by hand {median['autograd'] / median['by hand']:.2f}x")
        agent.close()


if __name__ == "__main__":
    import sys

    sys.path.append(sys.path.pop(0))  # this folder last: its mujoco.py must not shadow the mujoco package
    main()
