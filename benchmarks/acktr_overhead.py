"""Per-update cost of K-FAC in ACKTR: ACKTR against the same agent with a first-order step.

The baseline, ``FirstOrderACKTR`` below, is ACKTR with K-FAC preconditioning disabled and
nothing else changed: no Fisher pass, so the K-FAC optimizers have no statistics and take
their documented fallback, the plain gradient, under the same momentum, KL-clip scaling and
gradient clip. The difference in time is therefore exactly what K-FAC adds: the Fisher
pass's backward (to the layer outputs) and the statistics it records, the factor updates, the eigendecompositions (every
``inverse_every`` updates, so updates are timed in blocks of that many) and the
preconditioning. Both agents update from the same rollout batches on one thread: before each
update the K-FAC agent collects a fresh rollout with its own policy (not timed), as training
does, and each agent updates on it in turn. A block is one whole cycle (``inverse_every ·
stats_every`` updates: one refresh, the Fisher passes and the updates that reuse the
factors), timed as its mean per update, and the figure is the ratio of the blocks' median
per-update times.

Fresh rollouts matter for K-FAC's cost: how many eigenvectors ``eigen_tolerance`` keeps, and
so the cost of every preconditioned step, depends on the factors, and factors built from one
batch updated on again and again are not those of training (on Pong after 160 updates, the fc
layer's input factor keeps 540 of its 3137 eigenvectors on one batch, 1379 in a training run).
``--fixed-batch`` is the method before 2026-12-07: every update on one batch, each agent's
block in turn.

The ACKTR paper's "10-25% more per update" (Wu et al., 2017, table 3) is measured as
timesteps per second of whole training runs, environment included. ``--loop-steps N`` also
measures that: interleaved ``learn(N)`` runs of both agents, env-steps/s and their ratio.

Throughput against SB3's A2C (env-steps/s, whole training loop) is benchmarks/throughput.py:

    python benchmarks/throughput.py --algo acktr --env CartPole-v1 --steps 50000 --repeats 3

This script:

    python benchmarks/acktr_overhead.py --env CartPole-v1 --blocks 15 --loop-steps 30000
    python benchmarks/acktr_overhead.py --env Pendulum-v1
    python benchmarks/acktr_overhead.py --env CartPole-v1 --n-steps 256 --hidden 256 256
    python benchmarks/acktr_overhead.py --env PongNoFrameskip-v4 --blocks 3   # Nature CNN
    python benchmarks/acktr_overhead.py --env PongNoFrameskip-v4 --blocks 3 --train-updates 400 --spectrum 1e-3
    python benchmarks/acktr_overhead.py --env PongNoFrameskip-v4 --blocks 3 --set stats_every=4
    python benchmarks/acktr_overhead.py --env PongNoFrameskip-v4 --blocks 2 --set eigen_tolerance=0 --spectrum 1e-3 1e-2
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

import torch
from torch import Tensor

from trpo_lab.agents.acktr import ACKTR
from trpo_lab.config import parse_set_option
from trpo_lab.presets import load_preset
from trpo_lab.rollout.buffer import Observations, RolloutBatch


class FirstOrderACKTR(ACKTR):
    """ACKTR without K-FAC preconditioning: the forward pass without the Fisher pass."""

    def forward_with_fisher_pass(self, obs: Observations) -> tuple[Tensor, Tensor]:
        return self.policy.dist_params_and_value(obs)


def _time_block(agent: ACKTR, batch: RolloutBatch, updates: int) -> float:
    start = time.perf_counter()
    for _ in range(updates):
        agent.update(batch)
        agent.num_updates += 1  # as the training loop does: stats_every counts updates
    return (time.perf_counter() - start) / updates


def _time_block_on_rollouts(agents: dict[str, ACKTR], updates: int) -> dict[str, float]:
    """One cycle along the K-FAC agent's own training run: before each update it collects a
    fresh rollout with its current policy (not timed), and both agents update on that batch,
    one after the other. Mean seconds per update of each agent."""
    totals = dict.fromkeys(agents, 0.0)
    for _ in range(updates):
        agents["kfac"].collect_rollout()
        batch = agents["kfac"].buffer.batch()
        for name, agent in agents.items():
            start = time.perf_counter()
            agent.update(batch)
            totals[name] += time.perf_counter() - start
            agent.num_updates += 1
    return {name: total / max(updates, 1) for name, total in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--n-envs", type=int, default=None, help="default: the preset's")
    parser.add_argument("--n-steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--hidden", type=int, nargs="+", default=None, help="hidden sizes (default: the preset's)")
    parser.add_argument("--blocks", type=int, default=15, help="timed blocks per agent, interleaved")
    parser.add_argument("--loop-steps", type=int, default=0, help="also time learn() runs of this many env steps")
    parser.add_argument("--loop-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--train-updates", type=int, default=0, metavar="N",
        help="first train the K-FAC agent N updates on its own rollouts (not timed), so that the "
        "timed cycles see the factors of a run that far in (their kept eigenvectors grow with training)",
    )
    parser.add_argument(
        "--fixed-batch", action="store_true",
        help="time every update on one rollout batch, each agent's block in turn (the method before "
        "2026-12-07); by default each update takes a fresh rollout of the K-FAC agent, as training does",
    )
    parser.add_argument(
        "--spectrum", type=float, nargs="+", default=[], metavar="TAU",
        help="after timing, print how many eigenvectors of each layer's factors eigen_tolerance TAU keeps",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a preset hyperparameter of both agents (TOML value), e.g. --set stats_every=4",
    )
    args = parser.parse_args()
    if args.train_updates < 0:
        parser.error(f"--train-updates must be >= 0, got {args.train_updates}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="KFAC: no statistics recorded yet")

    hyperparameters, run = load_preset("acktr", args.env)
    if args.n_steps is not None:
        hyperparameters["n_steps"] = args.n_steps
    for item in args.set:
        try:
            parse_set_option(item, hyperparameters)  # trpo-lab train's --set
        except ValueError as error:
            parser.error(str(error))
    if args.hidden is not None:
        hyperparameters["policy_kwargs"] = {**hyperparameters.get("policy_kwargs", {}), "net_arch": args.hidden}
    n_envs = args.n_envs or int(run.get("n_envs", 8))
    kwargs: dict[str, Any] = {"n_envs": n_envs, "seed": 0, **hyperparameters}
    agents: dict[str, ACKTR] = {"kfac": ACKTR(args.env, **kwargs), "first_order": FirstOrderACKTR(args.env, **kwargs)}
    agents["kfac"].collect_rollout()
    batch = RolloutBatch(*(field.clone() for field in agents["kfac"].buffer.batch()))
    config = agents["kfac"].config
    block = config.inverse_every * config.stats_every  # one whole cycle: refresh, Fisher passes, reuses

    per_update: dict[str, list[float]] = {name: [] for name in agents}
    if args.fixed_batch:
        for agent in agents.values():  # warm-up: factors, eigendecompositions, allocator
            _time_block(agent, batch, block)
        for _ in range(args.blocks):
            for name, agent in agents.items():
                per_update[name].append(_time_block(agent, batch, block))
    else:
        _time_block_on_rollouts({"kfac": agents["kfac"]}, args.train_updates)
        _time_block_on_rollouts(agents, block)  # warm-up
        for _ in range(args.blocks):
            for name, seconds in _time_block_on_rollouts(agents, block).items():
                per_update[name].append(seconds)

    median = {name: statistics.median(times) for name, times in per_update.items()}
    print(
        f"ACKTR update cost on {args.env}: batch {batch.size} samples ({n_envs} envs x "
        f"{config.n_steps} steps), inverse_every {config.inverse_every}, stats_every "
        f"{config.stats_every}, {args.blocks} "
        f"{'interleaved blocks on one batch' if args.fixed_batch else 'cycles on fresh rollouts'}"
        f"{f' after {args.train_updates} training updates' if args.train_updates and not args.fixed_batch else ''} "
        f"of {block} updates per agent, {args.threads} thread(s), "
        f"net_arch {agents['kfac'].config.policy_kwargs.get('net_arch', [64, 64])}"
    )
    for name, times in per_update.items():
        spread = f"(min {1e3 * min(times):.3f}, max {1e3 * max(times):.3f})"
        print(f"  {name:12s} median {1e3 * median[name]:7.3f} ms/update   {spread}")
    print(f"  ratio kfac / first_order = {median['kfac'] / median['first_order']:.2f}x")
    for tolerance in args.spectrum:
        _print_spectrum(agents["kfac"], tolerance)
    for agent in agents.values():
        agent.close()
    if args.loop_steps:
        _loop_throughput(args.env, kwargs, args.loop_steps, args.loop_repeats)


def _print_spectrum(agent: ACKTR, tolerance: float) -> None:
    """Per K-FAC layer of the actor: the eigenvectors of A and G that ``eigen_tolerance`` keeps,
    and the live (not deflated) rows they are stored on."""
    optimizer = agent.actor_optimizer
    damping = optimizer.param_groups[0]["damping"]
    print(f"  eigen_tolerance {tolerance:g} (damping {damping:g}) keeps, after {agent.num_updates} updates:")
    for param, state in optimizer.state.items():
        if "eigenvalues_A" not in state:
            continue
        vectors_g, vectors_a, *_ = optimizer._truncated_basis(state, damping, tolerance)
        size_a, size_g = state["eigenvalues_A"].numel(), state["eigenvalues_G"].numel()
        print(f"    {tuple(param.shape)!s:18s} A {vectors_a.shape[1]:5d} of {size_a:5d} on {vectors_a.shape[0]:5d} rows"
              f"   G {vectors_g.shape[1]:4d} of {size_g:4d} on {vectors_g.shape[0]:4d} rows")


def _loop_throughput(env_id: str, kwargs: dict[str, Any], steps: int, repeats: int) -> None:
    """Env-steps/s of whole learn() runs (rollouts + updates), interleaved."""
    rates: dict[str, list[float]] = {"kfac": [], "first_order": []}
    classes: dict[str, type[ACKTR]] = {"kfac": ACKTR, "first_order": FirstOrderACKTR}
    for _ in range(repeats):
        for name, cls in classes.items():
            agent = cls(env_id, **kwargs)
            start = time.perf_counter()
            agent.learn(steps, tensorboard=False)
            rates[name].append(agent.num_timesteps / (time.perf_counter() - start))
            agent.close()
    median = {name: statistics.median(r) for name, r in rates.items()}
    print(f"Whole training loop on {env_id}: learn({steps}) x {repeats} interleaved runs per agent")
    for name, r in rates.items():
        print(f"  {name:12s} median {median[name]:8.0f} env-steps/s   runs {[round(x) for x in r]}")
    print(f"  throughput ratio first_order / kfac = {median['first_order'] / median['kfac']:.2f}x")


if __name__ == "__main__":
    import sys

    sys.path.append(sys.path.pop(0))  # this folder last: its mujoco.py must not shadow the mujoco package
    main()
