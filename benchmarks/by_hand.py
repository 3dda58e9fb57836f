"""TRPO's hand-written paths against autograd, in one process, interleaved.

Two pieces of a TRPO update have a hand-written form for a plain MLP, derived from the one
policy definition and tested equal to autograd (DESIGN principle 1):

- ``critic``: ``fit_critic`` takes the critic's MSE gradient from
  :func:`trpo_lab.nn.policy.mlp_mse_gradients` instead of autograd's per-step graph;
- ``fisher``: the natural step's Fisher-vector products come from
  :meth:`trpo_lab.nn.policy.ActorCritic.actor_fisher_product` (one forward-mode and one
  reverse pass on a cached forward) instead of a double backward through the KL.

This times each piece on one rollout of each env's preset agent (``fisher``: the whole
``natural_step``, the CG solve with its products), alternating the two paths (autograd: the
hand-written function patched to decline), and prints the medians and their ratio. One torch
thread.

    python benchmarks/by_hand.py --envs CartPole-v1 HalfCheetah-v5 Hopper-v5 --repeats 7
    python benchmarks/by_hand.py --pieces fisher --envs HalfCheetah-v5
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch

import trpo_lab.agents.trpo as trpo_module
from trpo_lab import TRPO
from trpo_lab.nn.policy import ActorCritic

PIECES = ("critic", "fisher")


@contextmanager
def declined(piece: str, on: bool) -> Any:
    """The hand-written function of ``piece`` patched to decline (autograd's path) while ``on``."""
    owner, name = (trpo_module, "mlp_mse_gradients") if piece == "critic" else (ActorCritic, "actor_fisher_product")
    original = getattr(owner, name)
    if on:
        setattr(owner, name, lambda *a, **k: None)
    try:
        yield
    finally:
        setattr(owner, name, original)


def timed_call(agent: TRPO, piece: str) -> Callable[[Any], Any]:
    if piece == "critic":
        return agent.fit_critic

    def natural_step(batch: Any) -> Any:
        obs = agent.policy.preprocess(batch.observations)
        return agent.natural_step(obs, batch, agent._advantages(batch))

    return natural_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["CartPole-v1", "HalfCheetah-v5"])
    parser.add_argument("--pieces", nargs="+", choices=PIECES, default=list(PIECES))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for env_id in args.envs:
        agent = TRPO.from_preset(env_id, seed=0)
        agent.collect_rollout()
        batch = agent.buffer.batch()
        cfg = agent.config
        for piece in args.pieces:
            call = timed_call(agent, piece)
            times: dict[str, list[float]] = {"by hand": [], "autograd": []}
            for _ in range(args.repeats):
                for path in times:
                    with declined(piece, on=path == "autograd"):
                        start = time.perf_counter()
                        call(batch)
                        times[path].append(time.perf_counter() - start)
            median = {path: statistics.median(values) for path, values in times.items()}
            what = (
                f"fit_critic (minibatch {cfg.batch_size}, {cfg.n_critic_updates} epochs)"
                if piece == "critic"
                else f"natural_step (CG, {cfg.cg_max_steps} steps at most)"
            )
            print(f"{env_id}: batch {batch.size}, {what}: median by hand {1e3 * median['by hand']:.1f} ms, "
                  f"autograd {1e3 * median['autograd']:.1f} ms, autograd / by hand "
                  f"{median['autograd'] / median['by hand']:.2f}x")
        agent.close()


if __name__ == "__main__":
    import sys

    sys.path.append(sys.path.pop(0))  # this folder last: its mujoco.py must not shadow the mujoco package
    main()
