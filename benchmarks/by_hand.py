"""The hand-written gradient paths of TRPO and PPO against autograd, in one process, interleaved.

Three pieces of an update have a hand-written form for a plain MLP, derived from the one
policy definition and tested equal to autograd (DESIGN principle 1):

- ``critic``: TRPO's ``fit_critic`` takes the critic's MSE gradient from
  :func:`trpo_lab.nn.policy.mlp_mse_gradients` instead of autograd's per-step graph;
- ``fisher``: TRPO's natural-step Fisher-vector products come from
  :meth:`trpo_lab.nn.policy.ActorCritic.actor_fisher_product` (one forward-mode and one
  reverse pass on a cached forward) instead of a double backward through the KL;
- ``ppo``: PPO's minibatch steps take the loss's gradient through
  :func:`trpo_lab.agents.ppo.ppo_loss_by_hand`, the distribution's
  ``log_prob_entropy_by_hand`` and :meth:`~trpo_lab.nn.policy.ActorCritic.dist_params_and_value_by_hand`
  instead of autograd; timed as the whole ``update`` (``n_epochs`` of minibatch steps), and
  (``compiled``) the same update of a second agent of the same preset with ``compile = true``
  (the hand-written path through ``torch.compile``; compiled in the untimed first round). With
  ``--sb3``, SB3 PPO's ``train()`` runs the same epochs over its own buffer of the same size,
  with the settings ``benchmarks/mujoco.py`` gives it (``trpo_lab.experiments.peers``;
  envs with rl-zoo settings there only).

This times each piece on one rollout of each env's preset agent (``fisher``: the whole
``natural_step``, the CG solve with its products), alternating the paths (autograd: the
hand-written function patched to decline), and prints the medians and their ratios. One torch
thread.

    python benchmarks/by_hand.py --envs CartPole-v1 HalfCheetah-v5 Hopper-v5 --repeats 7
    python benchmarks/by_hand.py --pieces fisher --envs HalfCheetah-v5
    python benchmarks/by_hand.py --pieces ppo --envs HalfCheetah-v5 --sb3
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
from trpo_lab import PPO, TRPO
from trpo_lab.agents.base import OnPolicyAgent
from trpo_lab.experiments.peers import ZOO_SETTINGS, _model_kwargs, peer_settings
from trpo_lab.nn.policy import ActorCritic

PIECES = ("critic", "fisher", "ppo")
HAND_WRITTEN: dict[str, tuple[Any, str]] = {
    "critic": (trpo_module, "mlp_mse_gradients"),
    "fisher": (ActorCritic, "actor_fisher_product"),
    "ppo": (ActorCritic, "dist_params_and_value_by_hand"),
}


@contextmanager
def declined(piece: str, on: bool) -> Any:
    """The hand-written function of ``piece`` patched to decline (autograd's path) while ``on``."""
    owner, name = HAND_WRITTEN[piece]
    original = getattr(owner, name)
    if on:
        setattr(owner, name, lambda *a, **k: None)
    try:
        yield
    finally:
        setattr(owner, name, original)


def timed_call(agent: Any, piece: str) -> Callable[[Any], Any]:
    if piece in ("critic", "ppo"):
        call: Callable[[Any], Any] = agent.fit_critic if piece == "critic" else agent.update
        return call

    def natural_step(batch: Any) -> Any:
        obs = agent.policy.preprocess(batch.observations)
        return agent.natural_step(obs, batch, agent._advantages(batch))

    return natural_step


def sb3_ppo_train(env_id: str) -> Callable[[Any], Any]:
    """SB3 PPO's ``train()`` with rl-zoo's settings for ``env_id``, on a full buffer of its own."""
    from stable_baselines3 import PPO as SB3PPO
    from stable_baselines3.common.env_util import make_vec_env

    settings = peer_settings("sb3-ppo", env_id)
    env = make_vec_env(env_id, n_envs=settings["n_envs"], seed=0)
    model: Any = SB3PPO("MlpPolicy", env, seed=0, device="cpu", verbose=0, **_model_kwargs(settings))
    model.learn(model.n_steps * settings["n_envs"])  # fills the buffer (and trains on it once)
    return lambda _batch: model.train()


def sb3_differs(agent: OnPolicyAgent, env_id: str) -> str:
    """Why SB3 PPO's ``train()`` is no like-for-like timing for ``agent`` (empty when it is):
    no rl-zoo settings for the env, or other epochs, minibatches or rollout sizes than our preset's."""
    if env_id not in ZOO_SETTINGS["sb3-ppo"]:
        return f"no rl-zoo PPO settings here (only {', '.join(ZOO_SETTINGS['sb3-ppo'])})"
    zoo, cfg = peer_settings("sb3-ppo", env_id), agent.config
    ours = {"n_envs": agent.n_envs, **{k: getattr(cfg, k) for k in ("n_steps", "batch_size", "n_epochs")}}
    different = {k: (v, zoo[k]) for k, v in ours.items() if zoo[k] != v}
    return ", ".join(f"{k} {a} here, {b} in rl-zoo's table" for k, (a, b) in different.items())


def describe(agent: OnPolicyAgent, piece: str) -> str:
    cfg: Any = agent.config
    if piece == "critic":
        return f"fit_critic (minibatch {cfg.batch_size}, {cfg.n_critic_updates} epochs)"
    if piece == "fisher":
        return f"natural_step (CG, {cfg.cg_max_steps} steps at most)"
    return f"PPO update ({cfg.n_epochs} epochs of minibatch {cfg.batch_size})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["CartPole-v1", "HalfCheetah-v5"])
    parser.add_argument("--pieces", nargs="+", choices=PIECES, default=list(PIECES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sb3", action="store_true", help="ppo: also time SB3 PPO's train() (rl-zoo settings)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for env_id in args.envs:
        for piece in args.pieces:
            agents: list[OnPolicyAgent] = (
                [PPO.from_preset(env_id, seed=0, compile=compile) for compile in (False, True)] if piece == "ppo"
                else [TRPO.from_preset(env_id, seed=0)]
            )
            agent = agents[0]
            agent.collect_rollout()
            batch = agent.buffer.batch()
            calls: dict[str, Callable[[Any], Any]] = {"by hand": timed_call(agent, piece), "autograd": timed_call(agent, piece)}
            if piece == "ppo":
                calls["compiled"] = timed_call(agents[1], piece)  # same preset and seed: the same policy to start
            if piece == "ppo" and args.sb3:
                differs = sb3_differs(agent, env_id)
                if differs:
                    print(f"{env_id}: SB3 skipped, {differs}")
                else:
                    calls["sb3"] = sb3_ppo_train(env_id)
            times: dict[str, list[float]] = {path: [] for path in calls}
            for repeat in range(args.repeats + 1):  # the first round warms up, untimed
                for path, call in calls.items():
                    with declined(piece, on=path == "autograd"):
                        start = time.perf_counter()
                        call(batch)
                        if repeat:
                            times[path].append(time.perf_counter() - start)
            median = {path: statistics.median(values) for path, values in times.items()}
            line = (f"{env_id}: batch {batch.size}, {describe(agent, piece)}: median by hand "
                    f"{1e3 * median['by hand']:.1f} ms, autograd {1e3 * median['autograd']:.1f} ms, "
                    f"autograd / by hand {median['autograd'] / median['by hand']:.2f}x")
            if "compiled" in median:
                line += (f"; compiled {1e3 * median['compiled']:.1f} ms, compiled / by hand "
                         f"{median['compiled'] / median['by hand']:.2f}x")
            if "sb3" in median:
                line += (f"; SB3 PPO train() {1e3 * median['sb3']:.1f} ms, by hand / SB3 "
                         f"{median['by hand'] / median['sb3']:.2f}x, autograd / SB3 {median['autograd'] / median['sb3']:.2f}x")
                if "compiled" in median:
                    line += f", compiled / SB3 {median['compiled'] / median['sb3']:.2f}x"
            print(line)
            for each in agents:
                each.close()


if __name__ == "__main__":
    import sys

    sys.path.append(sys.path.pop(0))  # this folder last: its mujoco.py must not shadow the mujoco package
    main()
