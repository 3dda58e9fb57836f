"""ACKTR (Wu et al. 2017) as a Stable-Baselines3 algorithm: the same algorithm as :class:`trpo_lab.agents.ACKTR`.

ACKTR is the advantage actor-critic update

    loss = −mean(Â log π(a|s)) − ent_coef · mean(H[π(·|s)]) + vf_coef · mean((V(s) − R)²)

with the gradient of each network clipped to ``max_grad_norm``, preconditioned by K-FAC and
the step clipped to a KL trust region, one :class:`trpo_lab.optim.KFAC` for the actor
(``kl_clip``) and one for the critic (``vf_kl_clip``): :class:`trpo_lab.agents.acktr.ActorCriticKFAC`,
the optimizer the native agent uses,

    V = (A ⊗ G + γ I)⁻¹ ∇,   ν = min(1, sqrt(κ / (η² Σ⟨V, ∇⟩))),   θ ← θ − η ν V (+ momentum)

So it *is* SB3's A2C with a K-FAC policy: the policy's ``evaluate_actions`` runs ACKTR's
sampled Fisher pass (:func:`trpo_lab.optim.fisher.sampled_fisher_loss`) inside
``track_statistics()``, and the policy's optimizer is ACKTR's pair of K-FACs. Arguments and
defaults are :class:`trpo_lab.config.ACKTRConfig`'s, validated by it; no A2C code is copied.

The actor's K-FAC holds the policy's features extractor (when it is shared with the critic,
as in SB3's ``CnnPolicy``, the policy's trust region bounds its step), ``mlp_extractor.policy_net``,
``action_net`` and a Gaussian ``log_std``; the critic's holds ``mlp_extractor.value_net``,
``value_net`` and, with ``share_features_extractor=False``, its own features extractor.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, TypeVar

import torch
from stable_baselines3 import A2C
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.policies import (
    ActorCriticCnnPolicy,
    ActorCriticPolicy,
    BasePolicy,
    MultiInputActorCriticPolicy,
)
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from torch import nn

from trpo_lab.agents.acktr import ActorCriticKFAC
from trpo_lab.config import ACKTRConfig
from trpo_lab.sb3.kfac import KFACPolicyMixin

__all__ = [
    "ACKTR",
    "ACKTRActorCriticCnnPolicy",
    "ACKTRActorCriticPolicy",
    "ACKTRMultiInputActorCriticPolicy",
    "ACKTRPolicyMixin",
]

SelfACKTR = TypeVar("SelfACKTR", bound="ACKTR")

#: The defaults of every argument ACKTR shares with the native agent.
_DEFAULTS = ACKTRConfig()
_DEFAULT_ENT_COEF: float = _DEFAULTS.scheduled_values(1.0)["ent_coef"]

# K-FAC diagnostics logged after every update: the actor's as train/<name>, the critic's as
# train/critic_<name>.
_LOGGED_KFAC_STATS: tuple[str, ...] = (
    "kl_scale",
    "effective_lr",
    "predicted_kl",
    "cond_max",
    "skipped_steps",
    "stats_rejected",
    "eigh_fallbacks",
    "nonfinite_directions",
)

# The ACKTR settings the policy's optimizer takes (besides the learning rate).
_OPTIMIZER_KEYS = ("kl_clip", "vf_kl_clip", "damping", "momentum", "stat_decay", "inverse_every", "max_grad_norm")


def actor_and_critic_modules(policy: ActorCriticPolicy) -> tuple[nn.Module, nn.Module]:
    """An SB3 actor-critic policy's parameters as an actor module and a critic module.

    Raises:
        ValueError: the policy has trainable parameters outside the two (a custom network
            without ``mlp_extractor.policy_net`` / ``value_net``), naming them.
    """
    actor, critic = nn.Module(), nn.Module()
    extractor = policy.mlp_extractor
    actor.features = policy.pi_features_extractor
    if not policy.share_features_extractor:
        critic.features = policy.vf_features_extractor
    for module, name, source in (
        (actor, "latent", getattr(extractor, "policy_net", None)),
        (actor, "head", policy.action_net),
        (critic, "latent", getattr(extractor, "value_net", None)),
        (critic, "head", policy.value_net),
    ):
        if isinstance(source, nn.Module):
            module.add_module(name, source)
    log_std = getattr(policy, "log_std", None)
    if isinstance(log_std, nn.Parameter):
        actor.log_std = nn.ParameterList([log_std])
    covered = {id(p) for part in (actor, critic) for p in part.parameters()}
    missing = [name for name, p in policy.named_parameters() if p.requires_grad and id(p) not in covered]
    if missing:
        raise ValueError(
            f"Invalid policy: parameters {missing} are in neither the actor nor the critic; ACKTR needs "
            "SB3's structure (features extractor, mlp_extractor.policy_net / value_net, action_net, value_net)"
        )
    return actor, critic


class ACKTRPolicyMixin(KFACPolicyMixin):
    """A K-FAC policy whose optimizer is ACKTR's :class:`~trpo_lab.agents.acktr.ActorCriticKFAC`.

    Args:
        acktr_kwargs: ``kl_clip``, ``vf_kl_clip``, ``damping``, ``momentum``, ``stat_decay``,
            ``inverse_every``, ``max_grad_norm`` (set by :class:`ACKTR` from its arguments).
        *args, **kwargs: As :class:`~trpo_lab.sb3.kfac.KFACPolicyMixin`.
    """

    def __init__(self, *args: Any, acktr_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.acktr_kwargs = dict(acktr_kwargs or {})
        unknown = sorted(set(self.acktr_kwargs) - set(_OPTIMIZER_KEYS))
        if unknown:
            raise ValueError(f"Invalid acktr_kwargs key(s) {unknown}; expected some of {list(_OPTIMIZER_KEYS)}")
        super().__init__(*args, **kwargs)

    def make_optimizer(self, lr: float) -> ActorCriticKFAC:
        settings = {key: getattr(_DEFAULTS, key) for key in _OPTIMIZER_KEYS} | self.acktr_kwargs
        actor, critic = actor_and_critic_modules(self)  # type: ignore[arg-type]
        return ActorCriticKFAC(actor, critic, lr=lr, **settings)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(acktr_kwargs=self.acktr_kwargs)
        return data


class ACKTRActorCriticPolicy(ACKTRPolicyMixin, ActorCriticPolicy):
    """SB3's ``MlpPolicy`` trained with ACKTR's two K-FACs."""


class ACKTRActorCriticCnnPolicy(ACKTRPolicyMixin, ActorCriticCnnPolicy):
    """SB3's ``CnnPolicy`` (NatureCNN, KFC for its Conv2d layers) trained with ACKTR's two K-FACs."""


class ACKTRMultiInputActorCriticPolicy(ACKTRPolicyMixin, MultiInputActorCriticPolicy):
    """SB3's ``MultiInputPolicy`` (Dict observations) trained with ACKTR's two K-FACs."""


class ACKTR(A2C):
    """Actor-critic using Kronecker-factored trust region (Wu et al. 2017) for Stable-Baselines3.

    The algorithm of :class:`trpo_lab.agents.ACKTR` (see the module docstring), with the
    defaults of :class:`trpo_lab.config.ACKTRConfig`. Accepts ``"MlpPolicy"``, ``"CnnPolicy"``
    and ``"MultiInputPolicy"`` (their ACKTR versions above) or any :class:`ACKTRPolicyMixin`
    policy. Logged: A2C's ``train/policy_loss``, ``train/value_loss``, ``train/entropy_loss``,
    ``train/explained_variance``; the actor K-FAC's ``train/kl_scale`` (ν), ``train/effective_lr``
    (ην), ``train/predicted_kl`` (½ (ην)² Σ⟨V, ∇⟩, the quadratic model of the step's KL),
    ``train/cond_max`` and robustness counters, and the critic's as ``train/critic_<name>``.

    Args:
        policy: ``"MlpPolicy"``, ``"CnnPolicy"``, ``"MultiInputPolicy"`` or an ACKTR policy class.
        env: A Gymnasium id, a ``gymnasium.Env`` or any SB3 ``VecEnv``.
        learning_rate: K-FAC's learning rate η (both networks), or an SB3 schedule. Default 0.25.
        n_steps: Steps per environment per update. Default 20.
        gamma: Discount factor. Default 0.99.
        gae_lambda: GAE λ; 1.0 gives ACKTR's n-step returns. Default 1.0.
        ent_coef: Entropy bonus coefficient. Default 0.0.
        vf_coef: Value loss coefficient. Default 0.5.
        max_grad_norm: Gradient-norm clip of each network before preconditioning. Default 0.5.
        kl_clip: The actor K-FAC's trust region κ (twice the predicted KL). Default 1e-3.
        vf_kl_clip: The critic K-FAC's trust region (about 4 E[ΔV²]), or None. Default 0.1.
        damping: K-FAC damping γ. Default 1e-2.
        momentum: K-FAC momentum. Default 0.9.
        stat_decay: Running-average decay of the Kronecker factors. Default 0.99.
        inverse_every: Updates between eigendecompositions of the factors. Default 10.
        normalize_advantage: Standardise advantages per batch. Default False.
        use_sde, sde_sample_freq, rollout_buffer_class, rollout_buffer_kwargs,
        stats_window_size, tensorboard_log, policy_kwargs, verbose, seed, device,
        _init_setup_model: As every SB3 algorithm. ``policy_kwargs`` takes the network's
            settings (``net_arch``, ``activation_fn``, ...); K-FAC's are the arguments above.

    Raises:
        ValueError: a hyperparameter outside :class:`~trpo_lab.config.ACKTRConfig`'s range
            (the message names it), or a policy that is not an ACKTR policy.

    Example:
        >>> model = ACKTR("MlpPolicy", "CartPole-v1", seed=0)   # doctest: +SKIP
        >>> model.learn(200_000)                                 # doctest: +SKIP
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": ACKTRActorCriticPolicy,
        "CnnPolicy": ACKTRActorCriticCnnPolicy,
        "MultiInputPolicy": ACKTRMultiInputActorCriticPolicy,
    }

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = _DEFAULTS.learning_rate,
        n_steps: int = _DEFAULTS.n_steps,
        gamma: float = _DEFAULTS.gamma,
        gae_lambda: float = _DEFAULTS.gae_lambda,
        ent_coef: float = _DEFAULT_ENT_COEF,
        vf_coef: float = _DEFAULTS.vf_coef,
        max_grad_norm: float = _DEFAULTS.max_grad_norm,
        kl_clip: float = _DEFAULTS.kl_clip,
        vf_kl_clip: float | None = _DEFAULTS.vf_kl_clip,
        damping: float = _DEFAULTS.damping,
        momentum: float = _DEFAULTS.momentum,
        stat_decay: float = _DEFAULTS.stat_decay,
        inverse_every: int = _DEFAULTS.inverse_every,
        normalize_advantage: bool = _DEFAULTS.normalize_advantage,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: torch.device | str = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        if not isinstance(policy, str) and not (isinstance(policy, type) and issubclass(policy, ACKTRPolicyMixin)):
            raise ValueError(
                f"Invalid policy: {getattr(policy, '__name__', policy)!r} does not train with ACKTR's K-FAC; "
                "ACKTR needs a K-FAC policy ('MlpPolicy', 'CnnPolicy', 'MultiInputPolicy' or a "
                "trpo_lab.sb3.acktr.ACKTRPolicyMixin subclass)"
            )
        policy_kwargs = dict(policy_kwargs or {})
        for key in ("kfac_kwargs", "vf_fisher_coef", "acktr_kwargs"):
            if key in policy_kwargs:
                raise ValueError(
                    f"Invalid policy_kwargs key {key!r}: pass ACKTR's K-FAC settings as ACKTR arguments "
                    f"({', '.join(_OPTIMIZER_KEYS)})"
                )
        # One validation for both ACKTRs: the config dataclass (a schedule is checked at its start).
        self.config = ACKTRConfig(
            learning_rate=learning_rate(1.0) if callable(learning_rate) else learning_rate,
            n_steps=n_steps,
            gamma=gamma,
            gae_lambda=gae_lambda,
            ent_coef=ent_coef,
            vf_coef=vf_coef,
            max_grad_norm=max_grad_norm,
            kl_clip=kl_clip,
            vf_kl_clip=vf_kl_clip,
            damping=damping,
            momentum=momentum,
            stat_decay=stat_decay,
            inverse_every=inverse_every,
            normalize_advantage=normalize_advantage,
        )
        cfg = self.config
        if not isinstance(ent_coef, (int, float)):  # SB3's A2C takes a number (its learning_rate may be a schedule)
            raise ValueError(f"Invalid ent_coef: {ent_coef!r}; expected a number (SB3's A2C has no ent_coef schedule)")
        self.kl_clip, self.vf_kl_clip = cfg.kl_clip, cfg.vf_kl_clip
        self.damping, self.momentum, self.stat_decay, self.inverse_every = (
            cfg.damping,
            cfg.momentum,
            cfg.stat_decay,
            cfg.inverse_every,
        )
        policy_kwargs["acktr_kwargs"] = {key: getattr(cfg, key) for key in _OPTIMIZER_KEYS}
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate if callable(learning_rate) else cfg.learning_rate,
            n_steps=cfg.n_steps,
            gamma=cfg.gamma,
            gae_lambda=cfg.gae_lambda,
            ent_coef=float(ent_coef),
            vf_coef=cfg.vf_coef,
            # The policy's optimizer clips each network; A2C's joint clip at infinity is the identity.
            max_grad_norm=math.inf,
            use_rms_prop=False,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            normalize_advantage=cfg.normalize_advantage,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=_init_setup_model,
        )

    def train(self) -> None:
        """A2C's update with the ACKTR policy (Fisher pass, two KL-clipped K-FAC steps), then K-FAC's logs."""
        super().train()
        optimizer = self.policy.optimizer
        assert isinstance(optimizer, ActorCriticKFAC)  # an ACKTRPolicyMixin policy builds one
        for prefix, kfac in (("", optimizer.actor), ("critic_", optimizer.critic)):
            stats = kfac.last_stats
            for name in _LOGGED_KFAC_STATS:
                self.logger.record(f"train/{prefix}{name}", stats[f"kfac/{name}"])

    def learn(
        self: SelfACKTR,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 100,
        tb_log_name: str = "ACKTR",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfACKTR:
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )
