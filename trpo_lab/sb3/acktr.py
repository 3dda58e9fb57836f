"""ACKTR (Wu et al. 2017) as a Stable-Baselines3 algorithm: A2C with a K-FAC trust region.

ACKTR is the advantage actor-critic update

    loss = −mean(Â log π(a|s)) − ent_coef · mean(H[π(·|s)]) + vf_coef · mean((V(s) − R)²)

with the gradient preconditioned by K-FAC on actor *and* critic and the step clipped to a
KL trust region (:class:`trpo_lab.optim.KFAC`):

    V = (A ⊗ G + γ I)⁻¹ ∇,   ν = min(1, sqrt(kl_clip / (η² Σ⟨V, ∇⟩))),   θ ← θ − η ν V (+ momentum)

So it *is* SB3's A2C with a K-FAC policy (:mod:`trpo_lab.sb3.kfac`): the policy's
``evaluate_actions`` runs ACKTR's sampled Fisher pass (actions drawn from the current policy,
value target = value + unit Gaussian noise) inside ``KFAC.track_statistics()``, and the
policy's optimizer is K-FAC. :class:`ACKTR` only sets ACKTR's defaults (those of
:class:`trpo_lab.config.ACKTRConfig`), builds the K-FAC policy from them and logs K-FAC's
diagnostics; no A2C code is copied.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, TypeVar

import torch
from stable_baselines3 import A2C
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule

from trpo_lab.optim.kfac import KFAC
from trpo_lab.sb3.kfac import (
    KFACActorCriticCnnPolicy,
    KFACActorCriticPolicy,
    KFACMultiInputActorCriticPolicy,
    KFACPolicyMixin,
)

__all__ = ["ACKTR"]

SelfACKTR = TypeVar("SelfACKTR", bound="ACKTR")

# K-FAC diagnostics logged after every update, as train/<name>.
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


class ACKTR(A2C):
    """Actor-critic using Kronecker-factored trust region (Wu et al. 2017) for Stable-Baselines3.

    Accepts ``"MlpPolicy"``, ``"CnnPolicy"`` and ``"MultiInputPolicy"`` (their K-FAC versions
    from :mod:`trpo_lab.sb3.kfac`) or any :class:`~trpo_lab.sb3.kfac.KFACPolicyMixin` policy.
    Logged: A2C's ``train/policy_loss``, ``train/value_loss``, ``train/entropy_loss``,
    ``train/explained_variance``, and ``train/kl_scale`` (ν), ``train/effective_lr`` (ην),
    ``train/predicted_kl`` (½ (ην)² Σ⟨V, ∇⟩, the quadratic model of the step's KL),
    ``train/cond_max`` and K-FAC's robustness counters.

    Args:
        policy: ``"MlpPolicy"``, ``"CnnPolicy"``, ``"MultiInputPolicy"`` or a K-FAC policy class.
        env: A Gymnasium id, a ``gymnasium.Env`` or any SB3 ``VecEnv``.
        learning_rate: K-FAC's learning rate η, or a schedule. Default 0.25.
        n_steps: Steps per environment per update. Default 20.
        gamma: Discount factor. Default 0.99.
        gae_lambda: GAE λ; 1.0 gives ACKTR's n-step returns. Default 1.0.
        ent_coef: Entropy bonus coefficient. Default 0.01.
        vf_coef: Value loss coefficient. Default 0.5.
        max_grad_norm: Gradient norm clip before preconditioning, or None (default) for
            none: the KL clip is the trust region.
        kl_clip: K-FAC's trust region κ on the predicted KL. Default 1e-3.
        damping: K-FAC damping γ. Default 1e-2.
        momentum: K-FAC momentum. Default 0.9.
        stat_decay: Running-average decay of the Kronecker factors. Default 0.99.
        inverse_every: Updates between eigendecompositions of the factors. Default 10.
        vf_fisher_coef: Weight of the critic's Gauss-Newton term in the Fisher loss. Default 1.0.
        normalize_advantage: Standardise advantages per batch. Default False.
        use_sde, sde_sample_freq, rollout_buffer_class, rollout_buffer_kwargs,
        stats_window_size, tensorboard_log, policy_kwargs, verbose, seed, device,
        _init_setup_model: As every SB3 algorithm. ``policy_kwargs`` takes the network's
            settings (``net_arch``, ``activation_fn``, ...); K-FAC's are the arguments above.

    Example:
        >>> model = ACKTR("MlpPolicy", "CartPole-v1", seed=0)   # doctest: +SKIP
        >>> model.learn(200_000)                                 # doctest: +SKIP
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": KFACActorCriticPolicy,
        "CnnPolicy": KFACActorCriticCnnPolicy,
        "MultiInputPolicy": KFACMultiInputActorCriticPolicy,
    }

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 0.25,
        n_steps: int = 20,
        gamma: float = 0.99,
        gae_lambda: float = 1.0,
        ent_coef: float = 0.01,
        vf_coef: float = 0.5,
        max_grad_norm: float | None = None,
        kl_clip: float = 1e-3,
        damping: float = 1e-2,
        momentum: float = 0.9,
        stat_decay: float = 0.99,
        inverse_every: int = 10,
        vf_fisher_coef: float = 1.0,
        normalize_advantage: bool = False,
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
        if not isinstance(policy, str) and not (isinstance(policy, type) and issubclass(policy, KFACPolicyMixin)):
            raise ValueError(
                f"Invalid policy: {getattr(policy, '__name__', policy)!r} does not train with trpo_lab.optim.KFAC; "
                "ACKTR needs a K-FAC policy ('MlpPolicy', 'CnnPolicy', 'MultiInputPolicy' or a "
                "trpo_lab.sb3.KFACPolicyMixin subclass)"
            )
        policy_kwargs = dict(policy_kwargs or {})
        for key in ("kfac_kwargs", "vf_fisher_coef"):
            if key in policy_kwargs:
                raise ValueError(
                    f"Invalid policy_kwargs key {key!r}: pass ACKTR's K-FAC settings as ACKTR arguments "
                    "(kl_clip, damping, momentum, stat_decay, inverse_every, vf_fisher_coef)"
                )
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r}; expected a number > 0 or None")
        self.kl_clip = kl_clip
        self.damping = damping
        self.momentum = momentum
        self.stat_decay = stat_decay
        self.inverse_every = inverse_every
        self.vf_fisher_coef = vf_fisher_coef
        policy_kwargs["kfac_kwargs"] = dict(
            kl_clip=kl_clip, damping=damping, momentum=momentum, stat_decay=stat_decay, inverse_every=inverse_every
        )
        policy_kwargs["vf_fisher_coef"] = vf_fisher_coef
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            gamma=gamma,
            gae_lambda=gae_lambda,
            ent_coef=ent_coef,
            vf_coef=vf_coef,
            # clip_grad_norm_ with an infinite bound leaves the gradient unchanged.
            max_grad_norm=math.inf if max_grad_norm is None else max_grad_norm,
            use_rms_prop=False,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            normalize_advantage=normalize_advantage,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=_init_setup_model,
        )

    def train(self) -> None:
        """A2C's update with the K-FAC policy (Fisher pass, KL-clipped K-FAC step), then K-FAC's logs."""
        super().train()
        optimizer = self.policy.optimizer
        assert isinstance(optimizer, KFAC)  # a KFACPolicyMixin policy builds one
        stats = optimizer.last_stats
        for name in _LOGGED_KFAC_STATS:
            self.logger.record(f"train/{name}", stats[f"kfac/{name}"])

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
