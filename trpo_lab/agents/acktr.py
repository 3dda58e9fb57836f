"""ACKTR (Wu et al., 2017): actor-critic with K-FAC natural-gradient steps, on the shared loop.

One update, on the whole rollout batch of N valid transitions with advantages Â (n-step
returns for ``gae_lambda = 1``, GAE otherwise) and returns R:

    L(θ, w) = −1/N Σ log π_θ(a|s) Â − ent_coef · 1/N Σ H[π_θ(·|s)]
              + vf_coef · 1/N Σ (V_w(s) − R)²
    g       = ∇L, clipped to norm ``max_grad_norm`` for the actor and the critic separately
    V       = (A ⊗ G + γI)⁻¹ g per Linear layer          (K-FAC, γ = ``damping``)
    ν       = min(1, sqrt(κ / (η² gᵀV)))                  (κ = ``kl_clip`` / ``vf_kl_clip``)
    m       ← μ m + (1 − μ) ν V,   params ← params − η m  (μ = ``momentum``, η = ``learning_rate``)

with one :class:`~trpo_lab.optim.KFAC` for the actor and one for the critic, held together by
:class:`ActorCriticKFAC` (which :class:`trpo_lab.sb3.ACKTR` uses too: the two are one
algorithm). Their Kronecker factors come from a *Fisher pass* on the same forward pass
(Wu et al., 2017, section 3.1), :func:`sampled_fisher_loss`:

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
      as in the reference Atari code, the value gradient spends the policy's KL budget;
      ``benchmarks/acktr_joint_vs_separate.py`` compares the two forms.
    - Images: every Conv2d and Linear layer is preconditioned, the extractors' included
      (K-FAC for convolutions, Grosse & Martens 2016). With separate extractors
      (``share_features_extractor = False``, the default) each belongs to its network's KFAC.
      With a shared trunk (the paper's Atari network) the trunk's layers join the actor's
      KFAC, and their Kronecker factors are those of the *joint* Fisher of the reference code
      (OpenAI baselines ``acktr``: ``joint_fisher_loss = pg_fisher_loss + vf_fisher_coef ·
      vf_fisher_loss``, ``vf_fisher_coef = 1``): the output gradients of the trunk's layers
      come from the whole :func:`sampled_fisher_loss`, policy term plus the value's
      Gauss–Newton term with weight 1, the same sum that this module's critic statistics use.
      The trunk's step then shares the actor's KL clip, with the loss gradient of both terms
      (``vf_coef`` weighting the value's), as the reference code's single optimizer does; the
      critic's head keeps its own KFAC and ``vf_kl_clip``. This is the paper's form for the
      part of the network both terms touch, and keeps the separate trust regions above for
      the heads.
    - The Gaussian log-std is a free parameter, not a Linear layer, so it falls back to the
      plain gradient inside the actor's KFAC (K-FAC's convention), still under the actor's
      KL clip and momentum. Its exact Fisher block is 2·I per action dimension (it is state
      independent), so the plain step is its natural step up to a factor of 2.
    - The gradient-norm clip acts before preconditioning. Whenever the KL clip is active
      (ν < 1) the step ν V does not depend on the scale of g, so the clip only matters for
      steps the KL clip leaves alone.
    - ``target_kl`` (None: off) is the adaptive step size of the continuous-control ACKTR
      (OpenAI baselines' ``acktr_cont``, desired KL 0.002): after each update the exact mean
      KL(π_before ‖ π_after) on the batch is measured and the actor's step size η_a = η · c is
      adjusted, c ← c / 1.5 when KL > 2 · target_kl, c ← c · 1.5 when KL < target_kl / 2
      (η_a kept in [1e-8, 1]). The KL clip alone cannot hold the KL: it bounds the *predicted*
      KL ½ΔᵀF̂Δ of the damped Kronecker-factored Fisher, and on Pendulum-v1 the measured KL
      is 2-7x that prediction and drifts by an order of magnitude between updates
      (``benchmarks/results/acktr_kl.md``). With ``target_kl`` the measured KL sets the step
      and ``kl_clip`` is a safety cap above it. The rule reads the KL of the previous update
      at the start of the next one (the metrics have been read by then), so the update makes
      no extra host synchronisation; c and that KL are in the checkpoint. Data-parallel: the
      KL is averaged over ranks first, so every rank keeps the same c. The critic's step is
      not adapted (its trust region ``vf_kl_clip`` bounds the change of the values).
    - ``learning_rate = "linear"`` decays η linearly to 0 over the ``total_timesteps`` given to
      :meth:`ACKTR.learn` (the reference Atari setting); the shared loop evaluates it
      (:mod:`trpo_lab.schedules`) and sets both KFACs' ``lr``, and η · c then replaces the
      actor's when ``target_kl`` is set. The retired ``lr_schedule`` key still reads (see
      :meth:`ACKTRConfig.from_dict`).
    - Data-parallel: the loss gradients of actor and critic are averaged over ranks in one
      bucket before clipping (``reducer.grads``), and both KFACs fold in the factors of every
      rank's Fisher pass (``statistics_reducer=reducer.weighted_means``), so every rank takes
      the same step. The Fisher-pass generator keeps the run's seed on every rank (each rank
      samples for its own states).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from trpo_lab.agents.base import OnPolicyAgent
from trpo_lab.agents.metrics import explained_variance, kl_sample, update_seed
from trpo_lab.config import ACKTRConfig
from trpo_lab.nn.policy import ActorCritic
from trpo_lab.optim._flat import clip_grad_norm_
from trpo_lab.optim.fisher import FisherLoss, sampled_fisher_loss
from trpo_lab.optim.kfac import KFAC, StatisticsReducer
from trpo_lab.rollout.buffer import Observations, RolloutBatch, map_observations

__all__ = ["ACKTR", "ActorCriticKFAC", "FisherLoss", "sampled_fisher_loss"]



# ---------------------------------------------------------------------- the optimizer pair


class ActorCriticKFAC:
    """ACKTR's optimizer: one :class:`~trpo_lab.optim.KFAC` per network, each with its own KL clip.

    It reads like one ``torch.optim`` optimizer, so SB3's algorithms can hold it as
    ``policy.optimizer``: :attr:`param_groups` (the actor's, then the critic's; setting ``lr``
    in each, as SB3's learning-rate update does, sets both), :meth:`zero_grad`, :meth:`step`,
    :meth:`state_dict` / :meth:`load_state_dict` (``{"actor": ..., "critic": ...}``) and
    :meth:`track_statistics` / :meth:`record_statistics` for the Fisher pass.

    :meth:`step` clips each network's gradient to ``max_grad_norm`` (the norms are
    :attr:`last_grad_norms`), then takes both KL-clipped K-FAC steps.

    Args:
        actor: The actor's parameters as a module (its Linear/Conv2d layers are preconditioned,
            free parameters such as a log-std take the plain gradient).
        critic: The critic's parameters as a module.
        lr, momentum, damping, stat_decay, inverse_every, eigen_tolerance: Shared by both KFACs.
        kl_clip: The actor's trust region κ.
        vf_kl_clip: The critic's trust region κ, or None for no clip.
        max_grad_norm: Per-network gradient-norm clip before preconditioning, or None.
        statistics_reducer: Folds every rank's factors in (data-parallel), for both KFACs.
        sync_free: Both KFACs run device-resident (see :class:`~trpo_lab.optim.KFAC`).
    """

    def __init__(
        self,
        actor: nn.Module,
        critic: nn.Module,
        *,
        lr: float,
        momentum: float,
        damping: float,
        stat_decay: float,
        inverse_every: int,
        kl_clip: float,
        vf_kl_clip: float | None,
        max_grad_norm: float | None,
        statistics_reducer: StatisticsReducer | None = None,
        sync_free: bool = False,
        eigen_tolerance: float = 0.0,
    ) -> None:
        common: dict[str, Any] = {
            "lr": lr,
            "momentum": momentum,
            "damping": damping,
            "stat_decay": stat_decay,
            "inverse_every": inverse_every,
            "eigen_tolerance": eigen_tolerance,
            "statistics_reducer": statistics_reducer,
            "sync_free": sync_free,
        }
        self.actor = KFAC(actor, kl_clip=kl_clip, **common)
        self.critic = KFAC(critic, kl_clip=vf_kl_clip, **common)
        self.max_grad_norm = max_grad_norm
        self._owner = {id(m): self.actor for m in actor.modules()} | {id(m): self.critic for m in critic.modules()}
        self.last_grad_norms: dict[str, Tensor] = {}

    @property
    def optimizers(self) -> dict[str, KFAC]:
        """``{"actor": KFAC, "critic": KFAC}``."""
        return {"actor": self.actor, "critic": self.critic}

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [*self.actor.param_groups, *self.critic.param_groups]

    def set_lr(self, lr: float) -> None:
        for group in self.param_groups:
            group["lr"] = lr

    @contextlib.contextmanager
    def track_statistics(self, hooks: bool = True) -> Iterator[None]:
        """Both KFACs' :meth:`~trpo_lab.optim.KFAC.track_statistics` at once."""
        with self.actor.track_statistics(hooks=hooks), self.critic.track_statistics(hooks=hooks):
            yield

    def record_statistics(self, module: nn.Module, inputs: Tensor, output_grads: Tensor) -> None:
        """Hand one layer's Fisher-pass inputs and output gradients to the KFAC that owns it."""
        optimizer = self._owner.get(id(module), self.actor)  # a foreign layer: KFAC names it
        optimizer.record_statistics(module, inputs, output_grads)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.actor.zero_grad(set_to_none=set_to_none)
        self.critic.zero_grad(set_to_none=set_to_none)

    def step(self, closure: None = None) -> None:
        """Clip each network's gradient to ``max_grad_norm``, then step both KFACs."""
        max_norm = math.inf if self.max_grad_norm is None else self.max_grad_norm  # inf: norms only
        self.last_grad_norms = {
            name: clip_grad_norm_(optimizer.param_groups[0]["params"], max_norm)
            for name, optimizer in self.optimizers.items()
        }
        for optimizer in self.optimizers.values():
            optimizer.step()

    @property
    def last_stats(self) -> dict[str, float | Tensor]:
        """Both :attr:`KFAC.last_stats`, as ``kfac/actor/...`` and ``kfac/critic/...``."""
        return {
            f"kfac/{name}/{key.removeprefix('kfac/')}": value
            for name, optimizer in self.optimizers.items()
            for key, value in optimizer.last_stats.items()
        }

    def state_dict(self) -> dict[str, Any]:
        return {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}

    def replaced_state_tensors(self) -> list[Tensor]:
        """Both KFACs' :meth:`KFAC.replaced_state_tensors`."""
        return [tensor for optimizer in self.optimizers.values() for tensor in optimizer.replaced_state_tensors()]

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Load :meth:`state_dict` (``strict`` is accepted for SB3's loader and ignored)."""
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(dict(state_dict[name]))


class _ActorModule(nn.Module):
    """The actor's layers and, for Box actions, the free log-std: one module for one KFAC.

    It only holds references, so the KFAC over it updates the policy's own parameters: a
    shared trunk's (``share_features_extractor``, see the module docstring), then
    ``ActorCritic.actor_parameters()`` in order (the actor's own extractor and MLP; the
    log-std sits in a submodule registered after the networks, since a module lists its own
    parameters before its children's).
    """

    def __init__(self, policy: ActorCritic) -> None:
        super().__init__()
        if policy.trunk_parameters():
            self.trunk = policy.features_extractor
        self.networks = nn.ModuleList(policy.actor_modules())
        if policy.log_std is not None:
            self.log_std = nn.ParameterList([policy.log_std])


# ---------------------------------------------------------------------- the agent


class ACKTR(OnPolicyAgent):
    """Actor Critic using Kronecker-Factored Trust Region (Wu et al., 2017).

    See the module docstring for the update. Hyperparameters are :class:`ACKTRConfig`'s
    (SB3 names where the concept exists: ``n_steps``, ``learning_rate``, ``gae_lambda``,
    ``ent_coef``, ``vf_coef``, ``max_grad_norm``; new ones: ``kl_clip``, ``vf_kl_clip``,
    ``damping``, ``momentum``, ``stat_decay``, ``inverse_every``, ``stats_every``,
    ``stats_batch_size``, ``kl_batch_size``, ``eigen_tolerance``);
    ``learning_rate`` and ``ent_coef`` may be schedules.

    ``stats_every = k`` runs the Fisher pass (the sampled-Fisher backward to the layer outputs
    and the factor statistics) on every k-th update only; the updates between precondition
    with the running factors as they stand, and ``inverse_every`` counts Fisher passes, so
    the eigenbases are refreshed every ``k · inverse_every`` updates. The factors are running
    averages over hundreds of batches (``stat_decay`` 0.99), so skipping batches changes them
    little. ``stats_batch_size = m`` runs each Fisher pass on ``m`` samples drawn at random
    from the rollout, in a forward of their own (the loss then takes a plain forward of the
    whole rollout): an unbiased estimate of the same expectations at ``m / batch`` of the cost.
    On a CPU the Nature CNN's statistics at the Atari batch of 320 frames cost twice its
    first-order update (see ``benchmarks/results/acktr_overhead.md``).
    ``batch_size`` is unused: every update is one step on the whole rollout.

    Logged per update, besides ``train/policy_loss``, ``train/value_loss``,
    ``train/entropy``, ``train/explained_variance`` and ``train/kl`` (the exact mean
    KL(π_before ‖ π_after) on the batch, or with ``kl_batch_size = m`` on ``m`` samples drawn
    at random each update, an unbiased estimate for ``m / batch`` of a forward; ``target_kl``'s
    adaptive step reads the same figure): every :attr:`KFAC.last_stats` entry of both
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
        self.optimizer = ActorCriticKFAC(
            _ActorModule(self.policy),
            nn.ModuleList(self.policy.critic_modules()),
            lr=self.current_values["learning_rate"],
            momentum=cfg.momentum,
            damping=cfg.damping,
            stat_decay=cfg.stat_decay,
            inverse_every=cfg.inverse_every,
            eigen_tolerance=cfg.eigen_tolerance,
            kl_clip=cfg.kl_clip,
            vf_kl_clip=cfg.vf_kl_clip,
            max_grad_norm=cfg.max_grad_norm,
            statistics_reducer=self.reducer.weighted_means,
            sync_free=self.sync_free,
        )
        self.fisher_generator = torch.Generator(device=self.device)
        self.fisher_generator.manual_seed(self.seed + 2)
        self.actor_lr_scale: float | Tensor = (
            torch.ones((), dtype=torch.float64, device=self.device) if self.sync_free else 1.0
        )
        """c of the adaptive step size (``target_kl``): the actor's step size is η · c (a 0-d
        float64 device tensor with ``sync_free``, decided there without a host read)."""
        self._last_kl: Tensor | None = None

    @property
    def actor_optimizer(self) -> KFAC:
        """The actor's KFAC."""
        return self.optimizer.actor

    @property
    def critic_optimizer(self) -> KFAC:
        """The critic's KFAC."""
        return self.optimizer.critic

    def _optimizer_states(self) -> dict[str, Any]:
        return {
            **self.optimizer.state_dict(),
            "fisher_rng": self.fisher_generator.get_state(),
            "adaptive_step": {
                "actor_lr_scale": self.actor_lr_scale,
                "last_kl": None if self._last_kl is None else self._last_kl.clone(),
            },
        }

    def _replaced_state_tensors(self) -> list[Tensor]:
        return self.optimizer.replaced_state_tensors()

    def _load_optimizer_states(self, states: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(states)
        self.fisher_generator.set_state(states["fisher_rng"])
        adaptive = states.get("adaptive_step", {"actor_lr_scale": 1.0, "last_kl": None})  # older checkpoints
        scale = float(adaptive["actor_lr_scale"])
        self.actor_lr_scale = (
            torch.tensor(scale, dtype=torch.float64, device=self.device) if self.sync_free else scale
        )
        last_kl = adaptive["last_kl"]
        self._last_kl = None if last_kl is None else last_kl.to(self.device)

    def _learning_rate_optimizers(self) -> list[Any]:
        return [self.optimizer]

    #: c's factor per update and η · c's bounds (OpenAI baselines' ``acktr_cont``).
    ADAPTIVE_FACTOR: ClassVar[float] = 1.5
    ADAPTIVE_LR_BOUNDS: ClassVar[tuple[float, float]] = (1e-8, 1.0)

    def _adapt_actor_step(self, lr: float) -> float | Tensor:
        """The actor's step size η · c for this update, after applying the rule of ``target_kl``
        to the previous update's measured KL (see the module docstring); with ``sync_free``,
        c and η · c are device tensors and the rule is decided by ``torch.where``."""
        target = self.config.target_kl
        if target is None:
            return lr
        if isinstance(self.actor_lr_scale, Tensor):
            return self._adapt_actor_step_on_device(lr, target, self.actor_lr_scale)
        if self._last_kl is not None:
            kl = float(self._last_kl)  # computed and read with the previous update's metrics
            self._last_kl = None
            if not math.isfinite(kl) or kl > 2.0 * target:
                self.actor_lr_scale /= self.ADAPTIVE_FACTOR
            elif kl < 0.5 * target:
                self.actor_lr_scale *= self.ADAPTIVE_FACTOR
        low, high = self.ADAPTIVE_LR_BOUNDS
        if lr > 0.0:  # keep c where η · c stays inside the bounds
            self.actor_lr_scale = min(max(self.actor_lr_scale, low / lr), high / lr)
        return lr * self.actor_lr_scale

    def _adapt_actor_step_on_device(self, lr: float, target: float, scale: Tensor) -> Tensor:
        if self._last_kl is not None:
            kl = self._last_kl.to(scale.dtype)
            self._last_kl = None
            shrink = ~torch.isfinite(kl) | (kl > 2.0 * target)
            scale = torch.where(
                shrink, scale / self.ADAPTIVE_FACTOR, torch.where(kl < 0.5 * target, scale * self.ADAPTIVE_FACTOR, scale)
            )
        low, high = self.ADAPTIVE_LR_BOUNDS
        if lr > 0.0:
            scale = scale.clamp(min=low / lr, max=high / lr)
        self.actor_lr_scale = scale
        return lr * scale

    # ------------------------------------------------------------------ update
    def forward_with_fisher_pass(self, obs: Observations) -> tuple[Tensor, Tensor]:
        """One forward of actor and critic, and the Fisher pass's backward on it.

        Statistics are recorded only here: every Linear and Conv2d layer's inputs from the forward and
        the gradients of :func:`sampled_fisher_loss` with respect to its outputs, taken by
        ``torch.autograd.grad`` straight into the two K-FACs (``record_statistics``; no
        module hooks, and no weight gradients for the Fisher pass). The returned
        ``(dist_params, values)`` keep their graph for the loss backward.
        """
        dist = self.policy.distribution
        with self.optimizer.track_statistics(hooks=False):
            dist_params, values, trace = self.policy.traced_forward(obs)
            sampled = dist.sample(dist_params.detach(), self.fisher_generator)
            fisher = sampled_fisher_loss(lambda a: dist.log_prob(dist_params, a), sampled, values, self.fisher_generator)
            outputs = [out for _, _, out in trace]
            output_grads = torch.autograd.grad(fisher.total(), outputs, retain_graph=True)
            for (layer, inputs, _), grad in zip(trace, output_grads, strict=True):
                self.optimizer.record_statistics(layer, inputs, grad)
        return dist_params, values

    def update(self, batch: RolloutBatch) -> dict[str, Tensor | float]:
        policy, cfg, dist = self.policy, self.config, self.policy.distribution
        obs = policy.preprocess(batch.observations)
        advantages = batch.advantages
        if cfg.normalize_advantage:
            advantages = self.reducer.normalize_advantages(advantages)
        lr = self.current_values["learning_rate"]  # the schedule's η, set on both KFACs by the loop
        actor_lr = self._adapt_actor_step(lr)
        self.actor_optimizer.param_groups[0]["lr"] = actor_lr

        fisher_pass = self.num_updates % cfg.stats_every == 0
        subset = cfg.stats_batch_size is not None and cfg.stats_batch_size < batch.size
        if fisher_pass and not subset:
            dist_params, values = self.forward_with_fisher_pass(obs)
        else:  # the loss's own forward; the factors (and their eigenbases) are reused or
            if fisher_pass:  # come from a forward of their own on a random subset
                index = torch.randperm(batch.size, generator=self.fisher_generator, device=self.device)
                chosen = index[: cfg.stats_batch_size]
                self.forward_with_fisher_pass(map_observations(lambda field: field[chosen], obs))
            dist_params, values = policy.dist_params_and_value(obs)
        self.optimizer.zero_grad(set_to_none=True)
        log_probs = dist.log_prob(dist_params, batch.actions)
        entropy = dist.entropy(dist_params).mean()
        policy_loss = -(log_probs * advantages).mean()
        value_loss = nn.functional.mse_loss(values, batch.returns)
        loss = policy_loss - self.current_values["ent_coef"] * entropy + cfg.vf_coef * value_loss
        torch.autograd.backward(loss)
        self.reducer.grads([*policy.trunk_parameters(), *policy.actor_parameters(), *policy.critic_parameters()])  # one bucket
        self.optimizer.step()

        kl_obs, rows = kl_sample(obs, batch.size, cfg.kl_batch_size, update_seed(self.local_seed, self.num_updates))
        old_params = dist_params.detach() if rows is None else dist_params.detach()[rows]
        with torch.no_grad():
            kl = dist.kl(old_params, policy.dist_params(kl_obs)).mean()
        if cfg.target_kl is not None:
            self._last_kl = self.reducer.mean(kl.detach())
        metrics: dict[str, Tensor | float] = {
            "train/policy_loss": policy_loss.detach(),
            "train/value_loss": value_loss.detach(),
            "train/entropy": entropy.detach(),
            "train/explained_variance": explained_variance(batch.values, batch.returns),
            "train/kl": kl,
            "train/actor_grad_norm": self.optimizer.last_grad_norms["actor"],
            "train/critic_grad_norm": self.optimizer.last_grad_norms["critic"],
        }
        if policy.log_std is not None:
            metrics["train/std"] = policy.log_std.detach().exp().mean()
        metrics["train/actor_learning_rate"] = actor_lr
        metrics.update(self.optimizer.last_stats)
        return metrics

