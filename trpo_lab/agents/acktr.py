"""ACKTR (Wu et al., 2017): actor-critic with K-FAC natural-gradient steps, on the shared loop.

One update, on the whole rollout batch of N valid transitions with advantages Â (n-step
returns for ``gae_lambda = 1``, GAE otherwise) and returns R:

    L(θ, w) = −1/N Σ log π_θ(a|s) Â − ent_coef · 1/N Σ H[π_θ(·|s)]
              + vf_coef · 1/N Σ (V_w(s) − R)²
    g       = ∇L, clipped to norm ``max_grad_norm`` for the actor and the critic separately
    V       = (A ⊗ G + γI)⁻¹ g per Linear layer          (K-FAC, γ = ``damping``)
    ν       = min(1, sqrt(κ / (η² gᵀV)))                  (κ = ``kl_clip`` / ``vf_kl_clip``)
    m       ← μ m + (1 − μ) ν V,   params ← params − η m  (μ = ``momentum``, η = ``learning_rate``)

with one :class:`~trpo_lab.optim.KFAC` for the actor and one for the critic. Their Kronecker
factors come from a *Fisher pass* on the same forward pass (Wu et al., 2017, section 3.1):

    actor:  −1/N Σ log π_θ(ã|s),              ã ~ π_θ(·|s)   (the true Fisher of the policy)
    critic: 1/N Σ (V_w(s) − (V_w(s) + ε))²,  ε ~ N(0, 1)     (Gauss–Newton: the Fisher of a
                                                              Gaussian with mean V_w(s))

Sampling ã afresh from the current policy gives the true Fisher of π. Reusing the batch
actions (the empirical Fisher) would tie the curvature estimate to the very samples the
gradient is built from, and is the Fisher of π only while the batch is on-policy.
The Fisher pass draws from its own generator, saved in checkpoints, so a resumed run draws
the same ã and ε as an uninterrupted one.

Design:
    - Two optimizers, not one over the whole ActorCritic, because the actor and the critic
      need different trust regions. KFAC scales its step by ν = min(1, sqrt(κ / (η² gᵀF̂⁻¹g))),
      so the step Δ = η ν F̂⁻¹g has ΔᵀF̂Δ ≤ κ. For the actor (κ = ``kl_clip``) that is twice
      the predicted KL of the policy. For the critic (κ = ``vf_kl_clip``) F̂ approximates
      4 E[J Jᵀ] (J = ∂V/∂w; the factor 4 = E[(2ε)²] comes from the squared-error Fisher loss
      above, as in the reference code), so E[(ΔV)²] ≲ κ / 4: the critic may move its values
      by about √κ / 2 (RMS) per update, 0.16 for the default 0.1. With one joint optimizer,
      as in the reference Atari code, the value gradient would spend the policy's KL budget.
    - The Gaussian log-std is a free parameter, not a Linear layer, so it falls back to the
      plain gradient inside the actor's KFAC (K-FAC's convention), still under the actor's
      KL clip and momentum. Its exact Fisher block is 2·I per action dimension (it is state
      independent), so the plain step is its natural step up to a factor of 2.
    - The gradient-norm clip acts before preconditioning. Whenever the KL clip is active
      (ν < 1) the step ν V does not depend on the scale of g, so the clip only matters for
      steps the KL clip leaves alone.
    - ``lr_schedule = "linear"`` decays η linearly to 0 over the ``total_timesteps`` given to
      :meth:`ACKTR.learn` (the reference Atari setting); "constant" (default) keeps it.
    - Data-parallel (``dist=``): the loss gradients of actor and critic are all-reduced in one
      bucket before clipping, and both KFACs fold in the factors of every rank's Fisher pass
      (``statistics_reducer``), so every rank takes the same step. The Fisher-pass generator
      keeps the run's seed on every rank (each rank samples for its own states).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from trpo_lab.agents.base import OnPolicyAgent
from trpo_lab.agents.trpo import explained_variance
from trpo_lab.buffer import RolloutBatch
from trpo_lab.config import ACKTRConfig
from trpo_lab.optim._flat import clip_grad_norm_
from trpo_lab.optim.kfac import KFAC
from trpo_lab.policies import ActorCritic

__all__ = ["ACKTR", "fisher_losses"]

_A = TypeVar("_A", bound="ACKTR")


class _ActorModule(nn.Module):
    """The actor network and, for Box actions, the free log-std: one module for one KFAC.

    It only holds references, so the KFAC over it updates the policy's own parameters, in
    ``ActorCritic.actor_parameters()`` order (the log-std sits in a submodule registered
    after the network, since a module lists its own parameters before its children's).
    """

    def __init__(self, policy: ActorCritic) -> None:
        super().__init__()
        self.actor = policy.actor
        if policy.log_std is not None:
            self.log_std = nn.ParameterList([policy.log_std])


def fisher_losses(
    policy: ActorCritic, dist_params: Tensor, values: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The losses whose gradients give ACKTR's Kronecker factors (means over the batch).

    Args:
        policy: Supplies the action distribution.
        dist_params: Distribution parameters of the current policy ``(N, param_dim)``, with grad.
        values: ``V_w(s)`` ``(N,)``, with grad.
        generator: Draws the sampled actions and the value noise.

    Returns:
        ``(actor_loss, critic_loss, sampled_actions)`` with ``actor_loss = −mean log π(ã|s)``
        for ã ~ π(·|s) and ``critic_loss = mean((V − (V + ε))²)`` for ε ~ N(0, 1), both
        differentiated through ``dist_params`` / ``values`` only.
    """
    dist = policy.distribution
    sampled = dist.sample(dist_params.detach(), generator)
    actor_loss = -dist.log_prob(dist_params, sampled).mean()
    noise = torch.randn(values.shape, generator=generator, device=values.device, dtype=values.dtype)
    critic_loss = (values - (values.detach() + noise)).square().mean()
    return actor_loss, critic_loss, sampled


class ACKTR(OnPolicyAgent):
    """Actor Critic using Kronecker-Factored Trust Region (Wu et al., 2017).

    See the module docstring for the update. Hyperparameters are :class:`ACKTRConfig`'s
    (SB3 names where the concept exists: ``n_steps``, ``learning_rate``, ``gae_lambda``,
    ``ent_coef``, ``vf_coef``, ``max_grad_norm``; new ones: ``kl_clip``, ``vf_kl_clip``,
    ``damping``, ``momentum``, ``stat_decay``, ``inverse_every``, ``lr_schedule``).
    ``batch_size`` is unused: every update is one step on the whole rollout.

    Logged per update, besides ``train/policy_loss``, ``train/value_loss``,
    ``train/entropy``, ``train/explained_variance`` and ``train/kl`` (the exact mean
    KL(π_before ‖ π_after) on the batch): every :attr:`KFAC.last_stats` entry of both
    optimizers, as ``kfac/actor/...`` and ``kfac/critic/...`` (KL-clip scale, effective
    step size, damping, eigenvalue extremes and condition number of the factors,
    eigendecomposition retries and fallbacks, skipped steps).

    Example:
        >>> agent = ACKTR("CartPole-v1", n_envs=8, seed=0)      # doctest: +SKIP
        >>> agent.learn(200_000, run_dir="runs/cartpole-acktr")  # doctest: +SKIP
    """

    algo: ClassVar[str] = "acktr"
    config_class: ClassVar[type[ACKTRConfig]] = ACKTRConfig
    config: ACKTRConfig

    def _setup(self) -> None:
        cfg = self.config
        common: dict[str, Any] = {
            "lr": cfg.learning_rate,
            "momentum": cfg.momentum,
            "damping": cfg.damping,
            "stat_decay": cfg.stat_decay,
            "inverse_every": cfg.inverse_every,
            # Data-parallel: fold the factors of every rank's Fisher pass into the averages.
            "statistics_reducer": None if self.dist is None else self.dist.weighted_means,
        }
        self.actor_optimizer = KFAC(_ActorModule(self.policy), kl_clip=cfg.kl_clip, **common)
        self.critic_optimizer = KFAC(self.policy.critic, kl_clip=cfg.vf_kl_clip, **common)
        self.fisher_generator = torch.Generator(device=self.device)
        self.fisher_generator.manual_seed(self.seed + 2)
        self._schedule_timesteps: int | None = None

    def _optimizer_states(self) -> dict[str, Any]:
        return {
            "actor": self.actor_optimizer.state_dict(),
            "critic": self.critic_optimizer.state_dict(),
            "fisher_rng": self.fisher_generator.get_state(),
        }

    def _load_optimizer_states(self, states: Mapping[str, Any]) -> None:
        self.actor_optimizer.load_state_dict(states["actor"])
        self.critic_optimizer.load_state_dict(states["critic"])
        self.fisher_generator.set_state(states["fisher_rng"])

    # ------------------------------------------------------------------ schedule
    def learn(self: _A, total_timesteps: int, *args: Any, **kwargs: Any) -> _A:
        """:meth:`OnPolicyAgent.learn`; ``total_timesteps`` is also the horizon of
        ``lr_schedule = "linear"`` (a resumed run decays over its new total)."""
        self._schedule_timesteps = total_timesteps
        return super().learn(total_timesteps, *args, **kwargs)

    def current_learning_rate(self) -> float:
        """η for the next update: ``learning_rate``, times ``1 − num_timesteps / total_timesteps``
        with ``lr_schedule = "linear"`` (constant until :meth:`learn` has set the total)."""
        lr = self.config.learning_rate
        if self.config.lr_schedule == "linear" and self._schedule_timesteps:
            lr *= max(0.0, 1.0 - self.num_timesteps / self._schedule_timesteps)
        return lr

    # ------------------------------------------------------------------ update
    def forward_with_fisher_pass(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """One forward of actor and critic, and the Fisher pass's backward on it.

        Statistics are recorded only here: every Linear layer's inputs from the forward and
        the Fisher losses' gradients with respect to its outputs, taken by
        ``torch.autograd.grad`` straight into the two K-FACs (``record_statistics``; no
        module hooks, and no weight gradients for the Fisher pass). The returned
        ``(dist_params, values)`` keep their graph for the loss backward.
        """
        n_actor = sum(isinstance(m, nn.Linear) for m in self.policy.actor)
        with self.actor_optimizer.track_statistics(hooks=False), self.critic_optimizer.track_statistics(hooks=False):
            dist_params, values, trace = self.policy.traced_forward(obs)
            actor_loss, critic_loss, _ = fisher_losses(self.policy, dist_params, values, self.fisher_generator)
            output_grads = torch.autograd.grad(actor_loss + critic_loss, [out for _, _, out in trace], retain_graph=True)
            for i, ((layer, inputs, _), grad) in enumerate(zip(trace, output_grads, strict=True)):
                optimizer = self.actor_optimizer if i < n_actor else self.critic_optimizer
                optimizer.record_statistics(layer, inputs, grad)
        return dist_params, values

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        policy, cfg, dist = self.policy, self.config, self.policy.distribution
        obs = policy.preprocess(batch.observations)
        advantages = batch.advantages
        if cfg.normalize_advantage:
            advantages = self._normalize_advantages(advantages)
        lr = self.current_learning_rate()
        optimizers = (self.actor_optimizer, self.critic_optimizer)
        for optimizer in optimizers:
            optimizer.param_groups[0]["lr"] = lr

        dist_params, values = self.forward_with_fisher_pass(obs)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        log_probs = dist.log_prob(dist_params, batch.actions)
        entropy = dist.entropy(dist_params).mean()
        policy_loss = -(log_probs * advantages).mean()
        value_loss = nn.functional.mse_loss(values, batch.returns)
        loss = policy_loss - cfg.ent_coef * entropy + cfg.vf_coef * value_loss
        loss.backward()
        self._all_reduce_grads([*policy.actor_parameters(), *policy.critic_parameters()])  # data-parallel: one bucket
        actor_grad_norm = clip_grad_norm_(policy.actor_parameters(), cfg.max_grad_norm)
        critic_grad_norm = clip_grad_norm_(policy.critic_parameters(), cfg.max_grad_norm)
        for optimizer in optimizers:
            optimizer.step()

        with torch.no_grad():
            old_params = dist_params.detach()
            kl = dist.kl(old_params, policy.dist_params(obs)).mean()
            metrics: dict[str, Tensor] = {
                "train/policy_loss": policy_loss.detach(),
                "train/value_loss": value_loss.detach(),
                "train/entropy": entropy.detach(),
                "train/explained_variance": explained_variance(batch.values, batch.returns),
                "train/kl": kl,
                "train/actor_grad_norm": actor_grad_norm,
                "train/critic_grad_norm": critic_grad_norm,
            }
            if policy.log_std is not None:
                metrics["train/std"] = policy.log_std.exp().mean()
        keys = list(metrics)
        values_host = torch.stack([metrics[k].float().reshape(()) for k in keys]).cpu().tolist()
        result = dict(zip(keys, values_host))
        result["train/learning_rate"] = lr
        result.update(self._curvature_metrics())
        return result

    def _curvature_metrics(self) -> dict[str, float]:
        """``kfac/actor/...`` and ``kfac/critic/...``: both optimizers' :attr:`KFAC.last_stats`."""
        metrics: dict[str, float] = {}
        for name, optimizer in (("actor", self.actor_optimizer), ("critic", self.critic_optimizer)):
            for key, value in optimizer.last_stats.items():
                metrics[f"kfac/{name}/{key.removeprefix('kfac/')}"] = value
        return metrics
