"""Cost of the pieces of a TRPO update, in gradient-equivalents.

One gradient-equivalent is the time of one forward + backward of the surrogate on the
batch.  Issue #6's targets: one Fisher-vector product <= 2 gradient-equivalents, one TRPO
actor update with 10 CG iterations <= 15.  Every piece is timed interleaved with the
gradient, so the ratio is robust to a loaded machine.

    python benchmarks/update_cost.py --env CartPole-v1 --n-envs 8 --n-steps 256
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from trpo_lab.agents.trpo import TRPO
from trpo_lab.optim.fisher import flat_grad


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--n-steps", type=int, default=256)
    parser.add_argument("--cg-max-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--fvp-backend", default="autograd", choices=["autograd", "func"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    agent = TRPO(
        args.env, n_envs=args.n_envs, seed=0, n_steps=args.n_steps, cg_max_steps=args.cg_max_steps,
        cg_tol=0.0, fvp_backend=args.fvp_backend,
    )
    agent.collect_rollout()
    batch = agent.buffer.batch()
    policy = agent.policy
    obs = policy.preprocess(batch.observations)
    adv = agent._advantages(batch)
    actor = policy.actor_parameters()
    with torch.no_grad():
        old = policy.dist_params(obs)
        old_logp = policy.distribution.log_prob(old, batch.actions)

    def gradient() -> torch.Tensor:
        return flat_grad(agent._surrogate(policy.dist_params(obs), batch.actions, old_logp, adv), actor)

    v = gradient()
    fvps = [agent._fvp(obs, old, actor)]

    def one_fvp() -> torch.Tensor:
        return fvps[0](v)

    def build_fvp() -> object:
        return agent._fvp(obs, old, actor)

    snapshot = [p.detach().clone() for p in actor]

    def actor_update() -> object:
        step = agent.natural_step(obs, batch, adv)
        agent.apply_step(step, obs, batch, adv)
        with torch.no_grad():
            for p, q in zip(actor, snapshot):
                p.copy_(q)
        return step

    def critic_fit() -> object:
        return agent.fit_critic(batch)

    pieces = {"fvp": one_fvp, "fvp_setup": build_fvp, "actor_update": actor_update, "critic_fit": critic_fit}
    for fn in (gradient, *pieces.values()):
        fn()
    ratios: dict[str, list[float]] = {name: [] for name in pieces}
    for _ in range(args.repeats):
        for name, fn in pieces.items():
            fvps[0] = agent._fvp(obs, old, actor)  # parameters were reset in place: fresh graph
            base = _time(gradient)
            ratios[name].append(_time(fn) / base)
    grad_ms = 1e3 * statistics.median(_time(gradient) for _ in range(args.repeats))
    print(f"{args.env}: batch {batch.size}, actor params {sum(p.numel() for p in actor)}, "
          f"cg_max_steps {args.cg_max_steps}, fvp_backend {args.fvp_backend}; gradient {grad_ms:.2f} ms")
    for name, r in ratios.items():
        print(f"  {name:13s} {statistics.median(r):6.2f} gradient-equivalents")


if __name__ == "__main__":
    import sys

    sys.path.append(sys.path.pop(0))  # this folder last: its mujoco.py must not shadow the mujoco package
    main()
