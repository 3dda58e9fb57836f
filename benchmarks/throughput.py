"""Training throughput (env-steps/s) of trpo_lab against other libraries' implementations.

Peers (``--peers``, comma-separated): ``sb3`` (Stable-Baselines3 / sb3-contrib, the default),
``tianshou`` (Tianshou 2.x) and ``skrl`` (skrl, torch backend); the last two come with
``pip install "trpo-lab[bench]"``. Every side trains whole ``learn()`` runs with the same
hyperparameters (:data:`SETTINGS`, plus our config's defaults for everything they leave out),
the same number of environments in its library's own in-process vector env, and one torch
thread on the CPU, in the same process, interleaved (ours, sb3, tianshou, skrl, ours, ...)
after a short warm-up run each, so machine noise hits every side alike. The figures that
matter are the ratios of medians. Where a peer cannot match a setting, its runner says so in a
comment (``benchmarks/results/throughput_peers.md`` lists them); a peer without a counterpart
for the algorithm is skipped with a note.

    python benchmarks/throughput.py --algo trpo --env CartPole-v1 --steps 50000 --repeats 3
    python benchmarks/throughput.py --algo ppo --peers sb3,tianshou,skrl
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import torch
from torch import nn

from trpo_lab.agents import AGENT_MODULES
from trpo_lab.config import AgentConfig, config_class

# The settings issue #6 fixes for the ratios (SB3's names, which are also ours).
SETTINGS: dict[str, dict[str, Any]] = {
    "trpo": {"n_steps": 256, "batch_size": 256, "cg_max_steps": 10, "n_critic_updates": 5},
    "npg": {"n_steps": 256, "batch_size": 256, "cg_max_steps": 10, "n_critic_updates": 5},
    "ppo": {"n_steps": 256, "batch_size": 256, "n_epochs": 4},
    "acktr": {"n_steps": 8},
}

Runner = Callable[[int], int]
"""Trains a fresh agent for at least the given env steps; returns the env steps it took."""

BENCH_EXTRA = 'pip install "trpo-lab[bench]"'


def matched_config(algo: str, settings: Mapping[str, Any]) -> AgentConfig:
    """Our config for ``algo`` with ``settings``: the one source of every peer's hyperparameters."""
    return config_class(algo).from_dict(settings)


def minibatches(cfg: AgentConfig, n_envs: int) -> int:
    """Minibatches per epoch over a rollout of ``n_steps * n_envs`` (libraries that take a count)."""
    return max(1, round(cfg.n_steps * n_envs / cfg.batch_size))


def _orthogonal_init(module: nn.Module, head_gain: float) -> None:
    """Our networks' init (:class:`trpo_lab.nn.policy.ActorCritic`): gain sqrt(2) on the hidden
    layers, ``head_gain`` on the last linear layer, zero biases."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    for i, linear in enumerate(linears):
        nn.init.orthogonal_(linear.weight, gain=head_gain if i == len(linears) - 1 else math.sqrt(2.0))
        nn.init.zeros_(linear.bias)


# ---------------------------------------------------------------------------------- ours
def ours(algo: str, env_id: str, n_envs: int, settings: Mapping[str, Any]) -> Runner:
    from trpo_lab.agents import agent_class

    def run(steps: int) -> int:
        agent = agent_class(algo)(env_id, n_envs=n_envs, seed=0, **settings)
        agent.learn(steps, tensorboard=False)
        agent.close()
        return agent.num_timesteps

    return run


# ---------------------------------------------------------------------------------- Stable-Baselines3
def sb3(algo: str, env_id: str, n_envs: int, settings: Mapping[str, Any]) -> Runner:
    from stable_baselines3.common.env_util import make_vec_env

    cls: Any
    if algo == "trpo":
        from sb3_contrib import TRPO as cls
    elif algo == "ppo":
        from stable_baselines3 import PPO as cls
    else:  # acktr: A2C with ACKTR's rollout length, SB3's A2C defaults otherwise
        from stable_baselines3 import A2C as cls

        settings = {k: v for k, v in settings.items() if k in ("n_steps",)}

    def run(steps: int) -> int:
        env = make_vec_env(env_id, n_envs=n_envs, seed=0)
        model = cls("MlpPolicy", env, seed=0, device="cpu", verbose=0, **settings)
        model.learn(steps)
        env.close()
        return int(model.num_timesteps)

    return run


# ---------------------------------------------------------------------------------- Tianshou 2.x
def tianshou(algo: str, env_id: str, n_envs: int, settings: Mapping[str, Any]) -> Runner:
    from tianshou.algorithm.algorithm_base import OnPolicyAlgorithm
    from tianshou.algorithm.modelfree.npg import NPG
    from tianshou.algorithm.modelfree.ppo import PPO
    from tianshou.algorithm.modelfree.reinforce import ProbabilisticActorPolicy
    from tianshou.algorithm.modelfree.trpo import TRPO
    from tianshou.algorithm.optim import AdamOptimizerFactory
    from tianshou.data import Collector, CollectStats, VectorReplayBuffer
    from tianshou.env import DummyVectorEnv
    from tianshou.trainer import OnPolicyTrainerParams
    from tianshou.utils.net.common import Net
    from tianshou.utils.net.continuous import ContinuousActorProbabilistic, ContinuousCritic
    from tianshou.utils.net.discrete import DiscreteActor, DiscreteCritic

    cfg: Any = matched_config(algo, settings)
    rollout = cfg.n_steps * n_envs

    def categorical(logits: torch.Tensor) -> torch.distributions.Distribution:
        return torch.distributions.Categorical(logits=logits)

    def gaussian(loc_scale: tuple[torch.Tensor, torch.Tensor]) -> torch.distributions.Distribution:
        return torch.distributions.Independent(torch.distributions.Normal(*loc_scale), 1)

    def build(probe: gym.Env[Any, Any]) -> OnPolicyAlgorithm[Any]:
        obs_shape, space = probe.observation_space.shape or (), probe.action_space

        def body() -> Net:  # 64x64 tanh, as ours
            return Net(state_shape=obs_shape, hidden_sizes=[64, 64], activation=nn.Tanh)

        actor: DiscreteActor | ContinuousActorProbabilistic
        critic: DiscreteCritic | ContinuousCritic
        if isinstance(space, gym.spaces.Discrete):
            actor = DiscreteActor(preprocess_net=body(), action_shape=int(space.n), softmax_output=False)
            critic = DiscreteCritic(preprocess_net=body())
            policy = ProbabilisticActorPolicy(actor=actor, dist_fn=categorical, action_space=space, action_scaling=False)
        else:
            # State-independent log std, initialised to 0 as ours. Mismatch: Tianshou bounds Box
            # actions by clipping to [-1, 1] and rescaling to the bounds; ours and SB3 clip to the bounds.
            actor = ContinuousActorProbabilistic(preprocess_net=body(), action_shape=space.shape or (), unbounded=True)
            critic = ContinuousCritic(preprocess_net=body())
            with warnings.catch_warnings():  # its check misreads an unbounded actor's max_action (1.0) as a bound
                warnings.filterwarnings("ignore", "action_scaling and action_bound_method", UserWarning)
                policy = ProbabilisticActorPolicy(actor=actor, dist_fn=gaussian, action_space=space)
        _orthogonal_init(actor, head_gain=0.01)
        _orthogonal_init(critic, head_gain=1.0)
        # max_batchsize (Tianshou's chunk for the values and old log-probabilities before an update,
        # default 256) is the whole rollout: one pass, as ours.
        common = {"policy": policy, "critic": critic, "optim": AdamOptimizerFactory(lr=float(cfg.learning_rate)),
                  "gamma": cfg.gamma, "gae_lambda": cfg.gae_lambda, "advantage_normalization": cfg.normalize_advantage,
                  "max_batchsize": rollout}
        if algo == "ppo":
            # One Adam over actor and critic, as ours. value_clip=False is ours' clip_range_vf=None.
            return PPO(**common, eps_clip=float(cfg.clip_range), value_clip=False, vf_coef=cfg.vf_coef,
                       ent_coef=float(cfg.ent_coef), max_grad_norm=cfg.max_grad_norm)
        # TRPO and NPG: Tianshou runs CG for a fixed 10 steps with damping 0.1 (ours: cg_max_steps = 10,
        # cg_damping = 0.1, so they match) and fits the critic with `optim_critic_iters` full-batch Adam
        # steps without gradient clipping. Mismatch: ours takes n_critic_updates epochs of batch_size
        # minibatches (5 x 8 steps of 256 here) with the gradient clipped to max_grad_norm; Tianshou's
        # optim_critic_iters = n_critic_updates full-batch steps see the same samples as many times.
        trust_region = {**common, "optim_critic_iters": cfg.n_critic_updates}
        if algo == "trpo":
            return TRPO(**trust_region, max_kl=cfg.target_kl, backtrack_coeff=cfg.line_search_shrinking_factor,
                        max_backtracks=cfg.line_search_max_iter)
        # Mismatch: Tianshou's NPG steps by the fixed trust_region_size (its default, 0.5) times the CG
        # direction; ours scales the direction to the KL radius target_kl (one more Fisher-vector product).
        return NPG(**trust_region)

    def run(steps: int) -> int:
        torch.manual_seed(0)
        envs = DummyVectorEnv([lambda: gym.make(env_id) for _ in range(n_envs)])
        envs.seed(0)
        probe = gym.make(env_id)
        algorithm = build(probe)
        probe.close()
        buffer = VectorReplayBuffer(total_size=rollout, buffer_num=n_envs)
        collector = Collector[CollectStats](algorithm, envs, buffer)
        # TRPO / NPG: the natural step on the whole rollout (batch_size=None), as ours and sb3-contrib;
        # PPO: n_epochs passes over batch_size minibatches.
        ppo = algo == "ppo"
        params = OnPolicyTrainerParams(
            training_collector=collector, max_epochs=1, epoch_num_steps=steps, collection_step_num_env_steps=rollout,
            batch_size=cfg.batch_size if ppo else None, update_step_num_repetitions=cfg.n_epochs if ppo else 1,
            test_collector=None, logger=None, verbose=False, show_progress=False,
        )
        info = algorithm.run_training(params)
        envs.close()
        return int(info.train_step)

    return run


# ---------------------------------------------------------------------------------- skrl (torch)
def skrl(algo: str, env_id: str, n_envs: int, settings: Mapping[str, Any]) -> Runner:
    from skrl.agents.torch.base import ExperimentCfg
    from skrl.agents.torch.ppo import PPO, PPO_CFG
    from skrl.agents.torch.trpo import TRPO, TRPO_CFG
    from skrl.envs.wrappers.torch import wrap_env
    from skrl.memories.torch import RandomMemory
    from skrl.models.torch import CategoricalMixin, DeterministicMixin, GaussianMixin, Model
    from skrl.trainers.torch import SequentialTrainer
    from skrl.trainers.torch.sequential import SequentialTrainerCfg
    from skrl.utils import set_seed

    from trpo_lab.nn.policy import ActorCritic

    logging.getLogger("skrl").setLevel(logging.WARNING)  # its per-run INFO lines
    cfg: Any = matched_config(algo, settings)
    n_steps: int = cfg.n_steps
    quiet = ExperimentCfg(write_interval=0, checkpoint_interval=0)  # no TensorBoard files, no checkpoints
    # Common to both: skrl normalises advantages over the whole rollout (ours: the same for TRPO,
    # per minibatch for PPO, as SB3), and takes a number of minibatches rather than their size.
    agent_cfg: Any
    if algo == "ppo":
        agent_cfg = PPO_CFG(
            rollouts=n_steps, learning_epochs=cfg.n_epochs, mini_batches=minibatches(cfg, n_envs),
            discount_factor=cfg.gamma, gae_lambda=cfg.gae_lambda, learning_rate=float(cfg.learning_rate),
            grad_norm_clip=cfg.max_grad_norm, ratio_clip=float(cfg.clip_range), value_clip=0.0,
            entropy_loss_scale=float(cfg.ent_coef), value_loss_scale=cfg.vf_coef, kl_threshold=0.0,
            time_limit_bootstrap=True, experiment=quiet,
        )
    else:
        # Mismatch: skrl's line search halves the step (0.5**i, fixed); ours shrinks by
        # line_search_shrinking_factor (0.8). Its Fisher-vector product re-runs the policy and the
        # KL's first derivative for every CG iteration; that is its design, not a setting.
        agent_cfg = TRPO_CFG(
            rollouts=n_steps, learning_epochs=cfg.n_critic_updates, mini_batches=minibatches(cfg, n_envs),
            discount_factor=cfg.gamma, gae_lambda=cfg.gae_lambda, learning_rate=float(cfg.learning_rate),
            grad_norm_clip=cfg.max_grad_norm, damping=cfg.cg_damping, max_kl_divergence=cfg.target_kl,
            conjugate_gradient_steps=cfg.cg_max_steps, max_backtrack_steps=cfg.line_search_max_iter,
            accept_ratio=cfg.line_search_accept_ratio, time_limit_bootstrap=True, experiment=quiet,
        )
    agent_class = PPO if algo == "ppo" else TRPO

    def models(env: Any) -> dict[str, Any]:
        # skrl takes any torch module: these are our own networks (64x64 tanh, orthogonal init).
        nets = ActorCritic(env.observation_space, env.action_space)

        class Value(DeterministicMixin, Model):  # type: ignore[misc]
            def __init__(self) -> None:
                Model.__init__(self, observation_space=env.observation_space, action_space=env.action_space, device="cpu")
                DeterministicMixin.__init__(self)
                self.net = nets.critic

            def compute(self, inputs: dict[str, Any], role: str = "") -> tuple[torch.Tensor, dict[str, Any]]:
                return self.net(inputs["observations"]), {}

        class CategoricalPolicy(CategoricalMixin, Model):  # type: ignore[misc]
            def __init__(self) -> None:
                Model.__init__(self, observation_space=env.observation_space, action_space=env.action_space, device="cpu")
                CategoricalMixin.__init__(self, unnormalized_log_prob=True)
                self.net = nets.actor

            def compute(self, inputs: dict[str, Any], role: str = "") -> tuple[torch.Tensor, dict[str, Any]]:
                return self.net(inputs["observations"]), {}

        class GaussianPolicy(GaussianMixin, Model):  # type: ignore[misc]
            def __init__(self) -> None:
                Model.__init__(self, observation_space=env.observation_space, action_space=env.action_space, device="cpu")
                GaussianMixin.__init__(self, clip_actions=True)  # clipped to the bounds, as ours
                self.net, self.log_std = nets.actor, nets.log_std

            def compute(self, inputs: dict[str, Any], role: str = "") -> tuple[torch.Tensor, dict[str, Any]]:
                return self.net(inputs["observations"]), {"log_std": self.log_std}

        discrete = isinstance(env.action_space, gym.spaces.Discrete)
        return {"policy": CategoricalPolicy() if discrete else GaussianPolicy(), "value": Value()}

    def run(steps: int) -> int:
        set_seed(0)
        # SAME_STEP autoreset: every step is a transition, as SB3's and Tianshou's vector envs give
        # (under gymnasium's NEXT_STEP default skrl would learn from the reset steps as transitions).
        # skrl's wrapper puts the env's tensors on CUDA where torch sees a GPU; this machine has none.
        vector = gym.vector.SyncVectorEnv([lambda: gym.make(env_id) for _ in range(n_envs)],
                                          autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
        env = wrap_env(vector, wrapper="gymnasium", verbose=False)
        agent = agent_class(
            models=models(env), memory=RandomMemory(memory_size=n_steps, num_envs=n_envs, device="cpu", replacement=False),
            observation_space=env.observation_space, state_space=env.state_space, action_space=env.action_space,
            device="cpu", cfg=agent_cfg,
        )
        # skrl's trainer counts vector steps; whole rollouts, so every update of the others happens here too.
        timesteps = math.ceil(steps / (n_steps * n_envs)) * n_steps
        trainer_cfg = SequentialTrainerCfg(timesteps=timesteps, headless=True, disable_progressbar=True,
                                           close_environment_at_exit=False)
        SequentialTrainer(env=env, agents=agent, cfg=trainer_cfg).train()
        env.close()
        return timesteps * n_envs

    return run


# ---------------------------------------------------------------------------------- the peers
@dataclass(frozen=True, kw_only=True)
class Peer:
    """A library we compare against.

    Args:
        label: What the tables call it.
        packages: Import names it needs; a missing one stops the run before anything trains.
        algorithms: Our algorithm -> its counterpart's name; others are skipped with a note.
        build: ``build(algo, env_id, n_envs, settings)`` -> a :data:`Runner`.
        box_only: Ours whose counterpart handles Box (Gaussian) actions only.
    """

    label: str
    packages: tuple[str, ...]
    algorithms: Mapping[str, str]
    build: Callable[[str, str, int, Mapping[str, Any]], Runner]
    box_only: frozenset[str] = field(default_factory=frozenset)

    def skip_reason(self, algo: str, action_space: gym.Space[Any]) -> str | None:
        """Why this peer has nothing to run for ``algo`` on an env with ``action_space`` (None: it has)."""
        if algo not in self.algorithms:
            return f"{self.label} has no counterpart for {algo}; skipped"
        if algo in self.box_only and not isinstance(action_space, gym.spaces.Box):
            return (f"{self.algorithms[algo]} supports Box (Gaussian) actions only, "
                    f"not {type(action_space).__name__}; skipped")
        return None

    def missing_package(self) -> str | None:
        return next((name for name in self.packages if importlib.util.find_spec(name) is None), None)


PEERS: dict[str, Peer] = {
    "sb3": Peer(label="sb3", packages=("stable_baselines3", "sb3_contrib"),
                algorithms={"trpo": "sb3-contrib TRPO", "ppo": "SB3 PPO", "acktr": "SB3 A2C"}, build=sb3),
    "tianshou": Peer(label="tianshou", packages=("tianshou",),
                     algorithms={"trpo": "Tianshou TRPO", "npg": "Tianshou NPG", "ppo": "Tianshou PPO"}, build=tianshou),
    # skrl's TRPO computes the KL of Gaussian policies only (its kl_divergence reads mean_actions and log_std).
    "skrl": Peer(label="skrl", packages=("skrl",), algorithms={"trpo": "skrl TRPO", "ppo": "skrl PPO"}, build=skrl,
                 box_only=frozenset({"trpo"})),
}


def parse_peers(text: str) -> list[str]:
    """``--peers``: a comma-separated subset of :data:`PEERS`, returned in :data:`PEERS`' order."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PEERS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"invalid peer(s) {', '.join(map(repr, unknown)) or repr(text)}; "
            f"expected a comma-separated subset of {','.join(PEERS)}"
        )
    return [name for name in PEERS if name in names]


def timed(fn: Runner, steps: int) -> float:
    start = time.perf_counter()
    taken = fn(steps)
    return taken / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", default="trpo", choices=sorted(set(SETTINGS) & set(AGENT_MODULES)))
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50_000)
    parser.add_argument("--warmup", type=int, default=4_096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peers", type=parse_peers, default=["sb3"], metavar="NAMES",
                        help=f"comma-separated, from {','.join(PEERS)} (default sb3)")
    args = parser.parse_args(argv)
    for name in args.peers:
        missing = PEERS[name].missing_package()
        if missing is not None:
            parser.error(f"peer {name!r} needs the {missing} package, which is not installed: {BENCH_EXTRA}")
    try:
        probe = gym.make(args.env)
    except gym.error.Error as exc:
        parser.error(f"--env {args.env!r}: {exc}")
    action_space = probe.action_space
    probe.close()
    torch.set_num_threads(1)
    settings = SETTINGS[args.algo]
    notes: list[str] = []
    chosen: list[str] = []
    for name in args.peers:
        reason = PEERS[name].skip_reason(args.algo, action_space)
        (notes if reason else chosen).append(reason or name)
    for note in notes:
        print(f"note: {note}")
    if not chosen:
        parser.error(f"no chosen peer ({','.join(args.peers)}) has a counterpart for {args.algo} on {args.env}")

    runners = {"trpo_lab": ours(args.algo, args.env, args.n_envs, settings)}
    runners.update({name: PEERS[name].build(args.algo, args.env, args.n_envs, settings) for name in chosen})
    for fn in runners.values():
        fn(args.warmup)
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, fn in runners.items():
            rates[name].append(timed(fn, args.steps))
    med = {name: statistics.median(r) for name, r in rates.items()}
    against = ", ".join(PEERS[name].algorithms[args.algo] for name in chosen)
    print(f"{args.algo} vs {against} on {args.env}: n_envs={args.n_envs}, {settings}, "
          f"{args.steps} steps x {args.repeats} interleaved repeats, 1 thread")
    for name, r in rates.items():
        print(f"  {name:9s} median {med[name]:9.0f} steps/s   runs {[round(x) for x in r]}")
    for name in chosen:
        print(f"  ratio trpo_lab / {name} = {med['trpo_lab'] / med[name]:.2f}x")
    return 0


if __name__ == "__main__":
    import sys

    sys.path.append(sys.path.pop(0))  # this folder last: its mujoco.py must not shadow the mujoco package
    raise SystemExit(main())
