"""TRPO and NPG as Stable-Baselines3 algorithms, on trpo_lab's one natural step.

SB3 collects the rollout (``OnPolicyAlgorithm.collect_rollouts``, GAE in its
``RolloutBuffer``); :meth:`NaturalGradientAlgorithm.train` does one update on SB3's policy and
buffer with :func:`trpo_lab.optim.trust_region.natural_step`, the function trpo_lab's own
TRPO and NPG call, and the curvature backends of :mod:`trpo_lab.agents.curvature`:

    L(θ)  = mean(exp(log π_θ(a|s) − log π_old(a|s)) Â)                surrogate
    g     = ∇_θ L(θ_old)
    s     ≈ F⁻¹ g       ``curvature``: CG on fisher_vector_product(mean KL(π_old ‖ π_θ), damping)
                        (default), K-FAC, Shampoo or the dense solve
    β     = sqrt(2 δ / sᵀ F s)                                        δ = target_kl
    TRPO: θ_new = θ_old + αᵏ β s, the first k with L improved and KL ≤ δ   (trust_region_line_search)
    NPG:  θ_new = θ_old + β s                                          (take_full_step)

then ``n_critic_updates`` epochs of minibatch regression of V on the GAE returns with the
policy's optimizer (SB3's Adam unless ``policy_kwargs`` says otherwise), with the actor's
gradients removed, as sb3-contrib's TRPO does. Line-search candidates are evaluated at flat
parameter vectors with ``torch.func.functional_call`` (the policy is never written to), one at
a time or all at once under ``torch.func.vmap`` (``line_search_batched``).

Hyperparameters are validated by trpo_lab's own :class:`~trpo_lab.config.TRPOConfig` /
:class:`~trpo_lab.config.NPGConfig` and take their defaults from it; those defaults equal
sb3-contrib's TRPO's, so a configuration (rl-zoo hyperparameters included) carries over
unchanged. New: ``cg_tol`` (sb3-contrib fixes it at 1e-10), ``curvature``,
``line_search_batched`` and ``line_search_accept_ratio``. The config's other fields do not
apply here: SB3 owns the policy (``policy_kwargs`` are SB3's), the critic's optimizer
(``critic_optimizer`` is always the policy's, ``learning_rate`` may be an SB3 schedule),
observation normalization (``VecNormalize``), and, as in sb3-contrib, the critic's gradients
are not clipped (``max_grad_norm``) and the surrogate has no entropy bonus.
"""

from __future__ import annotations

import copy
import warnings
from abc import abstractmethod
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import (
    ActorCriticCnnPolicy,
    ActorCriticPolicy,
    BasePolicy,
    MultiInputActorCriticPolicy,
)
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, RolloutBufferSamples, Schedule
from stable_baselines3.common.utils import explained_variance
from torch import Tensor, nn
from torch.nn import functional as F

from trpo_lab.agents.curvature import Curvature, CurvatureProblem, check_exact_size, make_curvature
from trpo_lab.agents.metrics import to_host
from trpo_lab.config import NPGConfig, TRPOConfig, TrustRegionConfig
from trpo_lab.optim._flat import flat_params
from trpo_lab.optim.fisher import fisher_vector_product, sampled_fisher_loss
from trpo_lab.optim.trust_region import (
    Evaluate,
    NaturalStep,
    natural_step,
    take_full_step,
    trust_region_line_search,
)
from trpo_lab.sb3.functional import ActorBatch, actor_objective, candidate_evaluator, mean_kl, surrogate

__all__ = ["NPG", "NaturalGradientAlgorithm", "NaturalGradientStep", "TRPO"]

SelfNaturalGradient = TypeVar("SelfNaturalGradient", bound="NaturalGradientAlgorithm")

NaturalGradientStep = NaturalStep
"""The step of one update before it is applied (:class:`trpo_lab.optim.trust_region.NaturalStep`)."""

_TRPO = TRPOConfig()
_NPG = NPGConfig()


class _ConfigValue:
    """A read-only attribute that reads the algorithm's validated config (``model.target_kl``)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        return self if instance is None else getattr(instance.config, self.name)

    def __set__(self, instance: Any, value: Any) -> None:
        raise AttributeError(
            f"{self.name} is read-only: it comes from the validated config; pass {self.name}={value!r} to the constructor"
        )


class NaturalGradientAlgorithm(OnPolicyAlgorithm):
    """Shared machinery of :class:`TRPO` and :class:`NPG`: surrogate, natural step, critic fit, logging.

    Subclasses set :attr:`config_class` and implement :meth:`apply_step` (the line search, or
    the full step).

    Args:
        policy: ``"MlpPolicy"``, ``"CnnPolicy"``, ``"MultiInputPolicy"`` or an
            ``ActorCriticPolicy`` subclass.
        env: A Gymnasium id, a ``gymnasium.Env`` or any SB3 ``VecEnv``.
        learning_rate: Learning rate of the critic's optimizer, or a schedule.
        use_sde, sde_sample_freq: SB3's generalized state-dependent exploration.
        rollout_buffer_class, rollout_buffer_kwargs: SB3's rollout buffer choice.
        stats_window_size, tensorboard_log, policy_kwargs, verbose, seed, device,
        _init_setup_model: As every SB3 algorithm.
        **hyperparameters: Fields of :attr:`config_class` (``n_steps``, ``batch_size``,
            ``gamma``, ``gae_lambda``, ``target_kl``, ``curvature``, ``cg_*``, ...), validated
            by it: a bad value raises ``ValueError`` naming the field, the value and what is
            allowed; an unknown name is refused with close suggestions.
    """

    config_class: ClassVar[type[TrustRegionConfig]] = TrustRegionConfig
    config: TrustRegionConfig
    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": ActorCriticPolicy,
        "CnnPolicy": ActorCriticCnnPolicy,
        "MultiInputPolicy": MultiInputActorCriticPolicy,
    }

    batch_size = _ConfigValue()
    cg_max_steps = _ConfigValue()
    cg_damping = _ConfigValue()
    cg_tol = _ConfigValue()
    n_critic_updates = _ConfigValue()
    normalize_advantage = _ConfigValue()
    target_kl = _ConfigValue()
    sub_sampling_factor = _ConfigValue()
    curvature = _ConfigValue()

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = _TRPO.learning_rate,
        *,
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
        **hyperparameters: Any,
    ) -> None:
        values = {name: int(v) if isinstance(v, np.integer) else v for name, v in hyperparameters.items()}
        if not callable(learning_rate):
            values["learning_rate"] = learning_rate
        self.config = self.config_class.from_dict(values)
        cfg = self.config
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=cfg.n_steps,
            gamma=cfg.gamma,
            gae_lambda=cfg.gae_lambda,
            ent_coef=0.0,  # the surrogate has no entropy bonus
            vf_coef=0.0,  # the critic is fitted separately
            max_grad_norm=0.0,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            device=device,
            seed=seed,
            _init_setup_model=False,
            supported_action_spaces=(spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary),
        )
        if self.env is not None:
            buffer_size = self.env.num_envs * self.n_steps
            if cfg.normalize_advantage and buffer_size < 2:
                raise ValueError(
                    f"Invalid n_steps: n_steps * n_envs = {buffer_size}; advantage normalization needs >= 2 samples"
                )
            if buffer_size % cfg.batch_size:
                warnings.warn(
                    f"batch_size {cfg.batch_size} does not divide the rollout size n_steps * n_envs = {buffer_size}; "
                    "every critic epoch ends with a smaller minibatch",
                    stacklevel=2,
                )
        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        # A zip saved before the config existed holds the hyperparameters as attributes.
        legacy = {
            name: self.__dict__.pop(name)
            for name in list(self.__dict__)
            if isinstance(getattr(type(self), name, None), _ConfigValue)
        }
        if legacy:
            self.config = self.config.replace(**legacy)
        super()._setup_model()
        self.actor_params = self._find_actor_parameters()
        actor_ids = {id(p) for p in self.actor_params}
        layers = [
            module
            for module in self.policy.modules()
            if isinstance(module, nn.Linear | nn.Conv2d) and id(module.weight) in actor_ids
        ]
        if self.config.curvature == "exact":  # no output-space Fisher here: F is the KL's Hessian
            check_exact_size(sum(p.numel() for p in self.actor_params), "curvature 'exact'", hessian_only=True)
        self._curvature: Curvature = make_curvature(self.config, self.actor_params, nn.ModuleList(layers))

    def _find_actor_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters the action distribution depends on (autograd decides, so
        custom policies need no naming convention); the rest of the policy is the critic."""
        obs, _ = self.policy.obs_to_tensor(self.observation_space.sample())
        trainable = [param for param in self.policy.parameters() if param.requires_grad]
        distribution = self.policy.get_distribution(obs)
        log_prob = distribution.log_prob(distribution.mode().detach()).sum()
        grads = torch.autograd.grad(log_prob, trainable, allow_unused=True)
        actor_params = [param for param, grad in zip(trainable, grads) if grad is not None]
        if not actor_params:
            raise RuntimeError("The policy's action distribution depends on no trainable parameter")
        return actor_params

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        state_dicts, tensors = super()._get_torch_save_params()
        # K-FAC's factors and Shampoo's statistics travel in the zip (CG has none).
        return ([*state_dicts, "_curvature"] if self._curvature.state_dict() else state_dicts), tensors

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_curvature", "actor_params"]

    # ------------------------------------------------------------------ pieces of the update
    def _actor_batch(self, rollout_data: RolloutBufferSamples) -> ActorBatch:
        k = self.config.sub_sampling_factor
        observations: Any = rollout_data.observations
        actions = rollout_data.actions
        old_log_prob = rollout_data.old_log_prob
        advantages = rollout_data.advantages
        if k > 1:
            observations = _every(observations, k)
            actions, old_log_prob, advantages = actions[::k], old_log_prob[::k], advantages[::k]
        if isinstance(self.action_space, spaces.Discrete):
            actions = actions.long().flatten()
        if self.config.normalize_advantage:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        with torch.no_grad():
            # get_distribution returns the policy's one Distribution object, rebuilt on each call:
            # keep a shallow copy that holds this call's (detached) torch distribution.
            old_distribution = copy.copy(self.policy.get_distribution(observations))
        return ActorBatch(observations, actions, old_log_prob, advantages, old_distribution)

    def _candidate_evaluator(self, batch: ActorBatch) -> Evaluate:
        return candidate_evaluator(self.policy, batch, self.actor_params)

    def _curvature_problem(self, batch: ActorBatch) -> CurvatureProblem:
        policy, params = self.policy, self.actor_params
        objective = actor_objective(policy, batch, params)

        def kl_of_flat(flat: Tensor) -> Tensor:
            return objective(flat)[1]

        def fisher_loss() -> Tensor:  # sampled actions, with SB3's own sampler and random stream
            distribution = policy.get_distribution(batch.observations)
            return sampled_fisher_loss(distribution.log_prob, distribution.get_actions()).policy

        return CurvatureProblem(theta=flat_params(params), kl_of_flat=kl_of_flat, fisher_loss=fisher_loss)

    def natural_step(self, batch: ActorBatch) -> NaturalStep:
        """The natural step on the batch: s from ``curvature``, scaled to the KL radius (β s, β = sqrt(2δ / sᵀFs))."""
        cfg, actor_params = self.config, self.actor_params
        # One forward serves the surrogate and the KL whose Hessian is the Fisher.
        distribution = self.policy.get_distribution(batch.observations)
        objective = surrogate(distribution, batch)
        grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(objective, actor_params, retain_graph=True)])
        fvp = fisher_vector_product(lambda: mean_kl(batch.old_distribution, distribution), actor_params, damping=cfg.cg_damping)
        step = natural_step(grad, fvp, cfg.target_kl, solve=self._curvature.solver(self._curvature_problem(batch)))
        metrics = {**step.metrics, "step_norm": step.full_step.norm()}
        evaluate = self._candidate_evaluator(batch)
        return NaturalStep(step.full_step, step.expected_improvement, -objective.detach(), evaluate, metrics)

    @abstractmethod
    def apply_step(self, step: NaturalStep, batch: ActorBatch) -> dict[str, Tensor]:
        """Apply the scaled step to the actor; returns metrics (at least ``kl_divergence_loss``)."""

    def fit_critic(self, actor_params: list[nn.Parameter]) -> float:
        """``n_critic_updates`` epochs of minibatch MSE regression of V on the returns.

        Returns:
            The mean value loss.
        """
        value_losses = []
        for _ in range(self.config.n_critic_updates):
            for rollout_data in self.rollout_buffer.get(self.config.batch_size):
                values_pred = self.policy.predict_values(rollout_data.observations)
                value_loss = F.mse_loss(rollout_data.returns, values_pred.flatten())
                self.policy.optimizer.zero_grad()
                torch.autograd.backward(value_loss)
                # Parameters shared with the actor move only with the trust-region step.
                for param in actor_params:
                    param.grad = None
                self.policy.optimizer.step()
                value_losses.append(value_loss.detach())
        return float(np.mean(torch.stack(value_losses).tolist()))  # one host read

    def train(self) -> None:
        """One update from the rollout buffer: natural-gradient actor step, then the critic fit."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        rollout_data = next(iter(self.rollout_buffer.get(batch_size=None)))
        batch = self._actor_batch(rollout_data)
        step = self.natural_step(batch)
        metrics = {**step.metrics, **self.apply_step(step, batch)}
        value_loss = self.fit_critic(self.actor_params)
        self._n_updates += 1
        explained_var = explained_variance(self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten())
        if hasattr(self.policy, "log_std"):
            metrics["std"] = torch.exp(self.policy.log_std).mean()
        self.logger.record("train/value_loss", value_loss)
        self.logger.record("train/explained_variance", explained_var)
        for key, value in to_host(metrics).items():
            self.logger.record(f"train/{key}", value)
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")

    def learn(
        self: SelfNaturalGradient,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str = "",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfNaturalGradient:
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name or type(self).__name__,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )


class TRPO(NaturalGradientAlgorithm):
    """Trust Region Policy Optimization (Schulman et al., 2015) for Stable-Baselines3.

    A drop-in for ``sb3_contrib.TRPO`` (same arguments and defaults), computed with trpo_lab's
    :func:`~trpo_lab.optim.trust_region.natural_step` and
    :func:`~trpo_lab.optim.trust_region.trust_region_line_search`. Logged:
    ``train/policy_objective``, ``train/kl_divergence_loss``, ``train/is_line_search_success``,
    ``train/value_loss``, ``train/explained_variance`` (sb3-contrib's keys) and
    ``train/linesearch_backtracks``, ``train/step_norm`` and, with CG, ``train/cg_residual``,
    ``train/cg_iterations``.

    Args:
        learning_rate, n_steps, batch_size, gamma, cg_max_steps, cg_damping,
        line_search_shrinking_factor, line_search_max_iter, n_critic_updates, gae_lambda,
        normalize_advantage, target_kl, sub_sampling_factor: sb3-contrib's, with its defaults
            (those of :class:`~trpo_lab.config.TRPOConfig`).
        cg_tol: CG stops changing the solution once ``‖g − F s‖² < cg_tol``. Default 1e-10.
        curvature: Where s ≈ F⁻¹g comes from: ``"cg"`` (default), ``"kfac"`` (K-FAC over the
            actor's Linear / Conv2d layers, from a sampled Fisher pass), ``"shampoo"`` or
            ``"exact"`` (dense solve; actors of at most 2,000 parameters).
        line_search_batched: Evaluate all step sizes in one vmapped pass. Default False.
        line_search_accept_ratio: Required fraction of the predicted improvement. Default 0.
        **kwargs: See :class:`NaturalGradientAlgorithm`.

    Example:
        >>> model = TRPO("MlpPolicy", "CartPole-v1", seed=0)   # doctest: +SKIP
        >>> model.learn(100_000)                                # doctest: +SKIP
    """

    config_class: ClassVar[type[TRPOConfig]] = TRPOConfig
    config: TRPOConfig
    line_search_shrinking_factor = _ConfigValue()
    line_search_max_iter = _ConfigValue()
    line_search_accept_ratio = _ConfigValue()
    line_search_batched = _ConfigValue()

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = _TRPO.learning_rate,
        n_steps: int = _TRPO.n_steps,
        batch_size: int = _TRPO.batch_size,
        gamma: float = _TRPO.gamma,
        cg_max_steps: int = _TRPO.cg_max_steps,
        cg_damping: float = _TRPO.cg_damping,
        line_search_shrinking_factor: float = _TRPO.line_search_shrinking_factor,
        line_search_max_iter: int = _TRPO.line_search_max_iter,
        n_critic_updates: int = _TRPO.n_critic_updates,
        gae_lambda: float = _TRPO.gae_lambda,
        normalize_advantage: bool = _TRPO.normalize_advantage,
        target_kl: float = _TRPO.target_kl,
        sub_sampling_factor: int = _TRPO.sub_sampling_factor,
        cg_tol: float = _TRPO.cg_tol,
        curvature: str = _TRPO.curvature,
        line_search_batched: bool = _TRPO.line_search_batched,
        line_search_accept_ratio: float = _TRPO.line_search_accept_ratio,
        _init_setup_model: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            policy,
            env,
            learning_rate,
            n_steps=n_steps,
            batch_size=batch_size,
            gamma=gamma,
            cg_max_steps=cg_max_steps,
            cg_damping=cg_damping,
            line_search_shrinking_factor=line_search_shrinking_factor,
            line_search_max_iter=line_search_max_iter,
            n_critic_updates=n_critic_updates,
            gae_lambda=gae_lambda,
            normalize_advantage=normalize_advantage,
            target_kl=target_kl,
            sub_sampling_factor=sub_sampling_factor,
            cg_tol=cg_tol,
            curvature=curvature,
            line_search_batched=line_search_batched,
            line_search_accept_ratio=line_search_accept_ratio,
            _init_setup_model=_init_setup_model,
            **kwargs,
        )

    def apply_step(self, step: NaturalStep, batch: ActorBatch) -> dict[str, Tensor]:
        cfg = self.config
        result = trust_region_line_search(
            self.actor_params,
            step,
            **cfg.line_search_options,
        )
        return {
            "policy_objective": -result.loss,
            "kl_divergence_loss": result.kl,
            "is_line_search_success": result.success.float(),
            "linesearch_backtracks": result.backtracks.float(),
        }


class NPG(NaturalGradientAlgorithm):
    """Natural policy gradient (Kakade, 2001) for Stable-Baselines3: TRPO without the line search.

    The natural direction is scaled to the KL radius ``target_kl`` and applied in full,
    ``θ_new = θ_old + sqrt(2δ / sᵀFs) s``; the KL actually reached is logged as
    ``train/kl_divergence_loss`` (it is only approximately δ: nothing backtracks).
    Same arguments as :class:`TRPO` without the line-search ones (defaults of
    :class:`~trpo_lab.config.NPGConfig`).

    Example:
        >>> model = NPG("MlpPolicy", "CartPole-v1", seed=0)    # doctest: +SKIP
        >>> model.learn(100_000)                                # doctest: +SKIP
    """

    config_class: ClassVar[type[NPGConfig]] = NPGConfig
    config: NPGConfig

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = _NPG.learning_rate,
        n_steps: int = _NPG.n_steps,
        batch_size: int = _NPG.batch_size,
        gamma: float = _NPG.gamma,
        cg_max_steps: int = _NPG.cg_max_steps,
        cg_damping: float = _NPG.cg_damping,
        n_critic_updates: int = _NPG.n_critic_updates,
        gae_lambda: float = _NPG.gae_lambda,
        normalize_advantage: bool = _NPG.normalize_advantage,
        target_kl: float = _NPG.target_kl,
        sub_sampling_factor: int = _NPG.sub_sampling_factor,
        cg_tol: float = _NPG.cg_tol,
        curvature: str = _NPG.curvature,
        _init_setup_model: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            policy,
            env,
            learning_rate,
            n_steps=n_steps,
            batch_size=batch_size,
            gamma=gamma,
            cg_max_steps=cg_max_steps,
            cg_damping=cg_damping,
            n_critic_updates=n_critic_updates,
            gae_lambda=gae_lambda,
            normalize_advantage=normalize_advantage,
            target_kl=target_kl,
            sub_sampling_factor=sub_sampling_factor,
            cg_tol=cg_tol,
            curvature=curvature,
            _init_setup_model=_init_setup_model,
            **kwargs,
        )

    def apply_step(self, step: NaturalStep, batch: ActorBatch) -> dict[str, Tensor]:
        loss, kl = take_full_step(self.actor_params, step)
        return {"policy_objective": -loss, "kl_divergence_loss": kl}


def _every(observations: Any, k: int) -> Any:
    if isinstance(observations, dict):
        return {key: value[::k] for key, value in observations.items()}
    return observations[::k]
