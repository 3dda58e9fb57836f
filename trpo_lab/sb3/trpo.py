"""TRPO and NPG as Stable-Baselines3 algorithms, on trpo_lab's curvature toolkit.

SB3 collects the rollout (``OnPolicyAlgorithm.collect_rollouts``, GAE in its
``RolloutBuffer``); :meth:`NaturalGradientAlgorithm.train` does one update with the same
numerics as :mod:`trpo_lab.agents.trpo`, on SB3's policy and buffer:

    L(θ)  = mean(exp(log π_θ(a|s) − log π_old(a|s)) Â)                surrogate
    g     = ∇_θ L(θ_old)
    s     = CG(F, g)        solve_cg on fisher_vector_product(mean KL(π_old ‖ π_θ), damping)
    β     = sqrt(2 δ / sᵀ F s)                                        δ = target_kl
    TRPO: θ_new = θ_old + αᵏ β s, the first k with L improved and KL ≤ δ   (kl_line_search)
    NPG:  θ_new = θ_old + β s

then ``n_critic_updates`` epochs of minibatch regression of V on the GAE returns with the
policy's optimizer (SB3's Adam unless ``policy_kwargs`` says otherwise), with the actor's
gradients removed, as sb3-contrib's TRPO does.

Hyperparameter names and defaults are sb3-contrib's TRPO's, so a configuration (rl-zoo
hyperparameters included) carries over unchanged; ``cg_tol`` is new (sb3-contrib fixes it
at 1e-10).
"""

from __future__ import annotations

from abc import abstractmethod

import copy
import warnings
from typing import Any, ClassVar, NamedTuple, TypeVar

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.distributions import Distribution, kl_divergence
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

from trpo_lab.optim._flat import assign_flat_, flat_params
from trpo_lab.optim.cg import solve_cg
from trpo_lab.optim.trust_region import scale_to_kl_radius
from trpo_lab.optim.fisher import fisher_vector_product
from trpo_lab.optim.line_search import kl_line_search

__all__ = ["NPG", "NaturalGradientAlgorithm", "NaturalGradientStep", "TRPO"]

SelfNaturalGradient = TypeVar("SelfNaturalGradient", bound="NaturalGradientAlgorithm")


class NaturalGradientStep(NamedTuple):
    """The natural-gradient step of one update, before it is applied.

    Attributes:
        actor_params: The parameters the policy distribution depends on, in flat-vector order.
        direction: ``s ≈ F⁻¹ g`` from conjugate gradient.
        full_step: ``β s``, scaled so that the quadratic model of the KL equals ``target_kl``.
        surrogate: ``L(θ_old)``, the surrogate objective at the current parameters.
        expected_improvement: ``g · β s``, the first-order predicted gain of the full step.
        cg_residual: ``‖g − F s‖`` from the CG recurrence.
        cg_iterations: The CG iterations that changed ``s``.
    """

    actor_params: list[nn.Parameter]
    direction: Tensor
    full_step: Tensor
    surrogate: Tensor
    expected_improvement: Tensor
    cg_residual: Tensor
    cg_iterations: Tensor


class _Batch(NamedTuple):
    observations: Tensor
    actions: Tensor
    old_log_prob: Tensor
    advantages: Tensor
    old_distribution: Distribution


class NaturalGradientAlgorithm(OnPolicyAlgorithm):
    """Shared machinery of :class:`TRPO` and :class:`NPG`: surrogate, CG step, critic fit, logging.

    Subclasses implement :meth:`apply_step` (the line search, or the full step).

    Args:
        policy: ``"MlpPolicy"``, ``"CnnPolicy"``, ``"MultiInputPolicy"`` or an
            ``ActorCriticPolicy`` subclass.
        env: A Gymnasium id, a ``gymnasium.Env`` or any SB3 ``VecEnv``.
        learning_rate: Learning rate of the critic's optimizer, or a schedule. Default 1e-3.
        n_steps: Steps per environment per update. Default 2048.
        batch_size: Critic minibatch size. Default 128.
        gamma: Discount factor. Default 0.99.
        cg_max_steps: Conjugate-gradient iterations (Fisher-vector products). Default 15.
        cg_damping: Multiple of the identity added to the Fisher. Default 0.1.
        cg_tol: CG stops changing the solution once ``‖g − F s‖² < cg_tol``. Default 1e-10.
        n_critic_updates: Critic epochs per update. Default 10.
        gae_lambda: GAE λ. Default 0.95.
        use_sde, sde_sample_freq: SB3's generalized state-dependent exploration.
        rollout_buffer_class, rollout_buffer_kwargs: SB3's rollout buffer choice.
        normalize_advantage: Standardise advantages per batch. Default True.
        target_kl: The KL radius δ of the step. Default 0.01.
        sub_sampling_factor: Use every k-th sample for the actor step. Default 1.
        stats_window_size, tensorboard_log, policy_kwargs, verbose, seed, device,
        _init_setup_model: As every SB3 algorithm.
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": ActorCriticPolicy,
        "CnnPolicy": ActorCriticCnnPolicy,
        "MultiInputPolicy": MultiInputActorCriticPolicy,
    }

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 1e-3,
        n_steps: int = 2048,
        batch_size: int = 128,
        gamma: float = 0.99,
        cg_max_steps: int = 15,
        cg_damping: float = 0.1,
        cg_tol: float = 1e-10,
        n_critic_updates: int = 10,
        gae_lambda: float = 0.95,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        normalize_advantage: bool = True,
        target_kl: float = 0.01,
        sub_sampling_factor: int = 1,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: torch.device | str = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        _check_positive_int("n_steps", n_steps)
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("cg_max_steps", cg_max_steps)
        _check_positive_int("n_critic_updates", n_critic_updates)
        _check_positive_int("sub_sampling_factor", sub_sampling_factor)
        if not cg_damping >= 0:
            raise ValueError(f"Invalid cg_damping: {cg_damping!r}; expected a number >= 0")
        if not cg_tol >= 0:
            raise ValueError(f"Invalid cg_tol: {cg_tol!r}; expected a number >= 0")
        if not target_kl > 0:
            raise ValueError(f"Invalid target_kl: {target_kl!r}; expected a number > 0")
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            gamma=gamma,
            gae_lambda=gae_lambda,
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
        self.normalize_advantage = normalize_advantage
        if self.env is not None:
            buffer_size = self.env.num_envs * self.n_steps
            if normalize_advantage and buffer_size < 2:
                raise ValueError(
                    f"Invalid n_steps: n_steps * n_envs = {buffer_size}; advantage normalization needs >= 2 samples"
                )
            if buffer_size % batch_size:
                warnings.warn(
                    f"batch_size {batch_size} does not divide the rollout size n_steps * n_envs = {buffer_size}; "
                    "every critic epoch ends with a smaller minibatch",
                    stacklevel=2,
                )
        self.batch_size = batch_size
        self.cg_max_steps = cg_max_steps
        self.cg_damping = cg_damping
        self.cg_tol = cg_tol
        self.target_kl = target_kl
        self.n_critic_updates = n_critic_updates
        self.sub_sampling_factor = sub_sampling_factor
        if _init_setup_model:
            self._setup_model()

    # ------------------------------------------------------------------ pieces of the update
    def _actor_batch(self, rollout_data: RolloutBufferSamples) -> _Batch:
        k = self.sub_sampling_factor
        observations = rollout_data.observations
        actions = rollout_data.actions
        old_log_prob = rollout_data.old_log_prob
        advantages = rollout_data.advantages
        if k > 1:
            observations = _every(observations, k)
            actions, old_log_prob, advantages = actions[::k], old_log_prob[::k], advantages[::k]
        if isinstance(self.action_space, spaces.Discrete):
            actions = actions.long().flatten()
        if self.normalize_advantage:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        with torch.no_grad():
            # get_distribution returns the policy's one Distribution object, rebuilt on each call:
            # keep a shallow copy that holds this call's (detached) torch distribution.
            old_distribution = copy.copy(self.policy.get_distribution(observations))
        return _Batch(observations, actions, old_log_prob, advantages, old_distribution)

    def _surrogate(self, batch: _Batch) -> Tensor:
        log_prob = self.policy.get_distribution(batch.observations).log_prob(batch.actions)
        return (batch.advantages * torch.exp(log_prob - batch.old_log_prob)).mean()

    def _mean_kl(self, batch: _Batch) -> Tensor:
        return kl_divergence(batch.old_distribution, self.policy.get_distribution(batch.observations)).mean()

    def natural_step(self, batch: _Batch) -> NaturalGradientStep:
        """``s = CG(F, g)`` on the batch, scaled to the KL radius: ``β s``, ``β = sqrt(2δ / sᵀFs)``.

        The actor parameters are those the surrogate depends on (autograd decides, so custom
        policies need no naming convention); the rest of the policy is the critic.
        """
        trainable = [param for param in self.policy.parameters() if param.requires_grad]
        surrogate = self._surrogate(batch)
        grads = torch.autograd.grad(surrogate, trainable, allow_unused=True)
        actor_params = [param for param, grad in zip(trainable, grads) if grad is not None]
        if not actor_params:
            raise RuntimeError("The policy's action distribution depends on no trainable parameter")
        grad = torch.cat([grad.reshape(-1) for grad in grads if grad is not None])
        fvp = fisher_vector_product(lambda: self._mean_kl(batch), actor_params, damping=self.cg_damping)
        cg = solve_cg(fvp, grad, max_iter=self.cg_max_steps, tol=self.cg_tol, stop_early=grad.device.type == "cpu")
        # (F + damping·I) s = g − r: sᵀFs without another Fisher-vector product.
        full_step = scale_to_kl_radius(cg.x, torch.dot(cg.x, grad - cg.residual), self.target_kl)
        return NaturalGradientStep(
            actor_params=actor_params,
            direction=cg.x,
            full_step=full_step,
            surrogate=surrogate.detach(),
            expected_improvement=torch.dot(grad, full_step),
            cg_residual=cg.residual_norm,
            cg_iterations=cg.iterations,
        )

    def _candidate_evaluator(self, batch: _Batch, actor_params: list[nn.Parameter]) -> Any:
        """``(K, P)`` flat actor vectors -> (negative surrogates (K,), mean KLs (K,)).

        SB3 policies are evaluated through their methods, so each candidate is written into
        the parameters and the original values are restored afterwards (like
        ``torch.optim.LBFGS``'s try-a-step-and-restore).
        """

        def evaluate(candidates: Tensor) -> tuple[Tensor, Tensor]:
            original = flat_params(actor_params)
            losses, kls = [], []
            try:
                for candidate in candidates:
                    assign_flat_(actor_params, candidate)
                    losses.append(-self._surrogate(batch))
                    kls.append(self._mean_kl(batch))
            finally:
                assign_flat_(actor_params, original)
            return torch.stack(losses), torch.stack(kls)

        return evaluate

    @abstractmethod
    def apply_step(self, step: NaturalGradientStep, batch: _Batch) -> dict[str, float]:
        """Apply the scaled step to the actor; returns ``train/...`` metrics (at least ``kl_divergence_loss``)."""

    def fit_critic(self, actor_params: list[nn.Parameter]) -> float:
        """``n_critic_updates`` epochs of minibatch MSE regression of V on the returns.

        Returns:
            The mean value loss.
        """
        value_losses = []
        for _ in range(self.n_critic_updates):
            for rollout_data in self.rollout_buffer.get(self.batch_size):
                values_pred = self.policy.predict_values(rollout_data.observations)
                value_loss = F.mse_loss(rollout_data.returns, values_pred.flatten())
                self.policy.optimizer.zero_grad()
                value_loss.backward()
                # Parameters shared with the actor move only with the trust-region step.
                for param in actor_params:
                    param.grad = None
                self.policy.optimizer.step()
                value_losses.append(value_loss.item())
        return float(np.mean(value_losses))

    def train(self) -> None:
        """One update from the rollout buffer: natural-gradient actor step, then the critic fit."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        rollout_data = next(iter(self.rollout_buffer.get(batch_size=None)))
        batch = self._actor_batch(rollout_data)
        step = self.natural_step(batch)
        actor_metrics = self.apply_step(step, batch)
        value_loss = self.fit_critic(step.actor_params)
        self._n_updates += 1
        explained_var = explained_variance(
            self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten()
        )
        host = torch.stack(
            [step.cg_residual, step.cg_iterations.to(step.cg_residual.dtype), step.full_step.norm()]
        ).tolist()
        self.logger.record("train/value_loss", value_loss)
        self.logger.record("train/explained_variance", explained_var)
        for key, value in actor_metrics.items():
            self.logger.record(f"train/{key}", value)
        self.logger.record("train/cg_residual", host[0])
        self.logger.record("train/cg_iterations", host[1])
        self.logger.record("train/step_norm", host[2])
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", torch.exp(self.policy.log_std).mean().item())
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

    A drop-in for ``sb3_contrib.TRPO`` (same arguments and defaults, plus ``cg_tol``), computed
    with trpo_lab's :func:`~trpo_lab.optim.solve_cg`, :func:`~trpo_lab.optim.fisher_vector_product`
    and :func:`~trpo_lab.optim.kl_line_search`. Logged: ``train/policy_objective``,
    ``train/kl_divergence_loss``, ``train/is_line_search_success``, ``train/value_loss``,
    ``train/explained_variance`` (sb3-contrib's keys) and ``train/linesearch_backtracks``,
    ``train/cg_residual``, ``train/cg_iterations``, ``train/step_norm``.

    Args:
        line_search_shrinking_factor: Ratio between consecutive step sizes. Default 0.8.
        line_search_max_iter: Step sizes tried. Default 10.
        **kwargs: See :class:`NaturalGradientAlgorithm`.

    Example:
        >>> model = TRPO("MlpPolicy", "CartPole-v1", seed=0)   # doctest: +SKIP
        >>> model.learn(100_000)                                # doctest: +SKIP
    """

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 1e-3,
        n_steps: int = 2048,
        batch_size: int = 128,
        gamma: float = 0.99,
        cg_max_steps: int = 15,
        cg_damping: float = 0.1,
        line_search_shrinking_factor: float = 0.8,
        line_search_max_iter: int = 10,
        n_critic_updates: int = 10,
        gae_lambda: float = 0.95,
        normalize_advantage: bool = True,
        target_kl: float = 0.01,
        sub_sampling_factor: int = 1,
        _init_setup_model: bool = True,
        **kwargs: Any,
    ) -> None:
        if not 0 < line_search_shrinking_factor < 1:
            raise ValueError(
                f"Invalid line_search_shrinking_factor: {line_search_shrinking_factor!r}; expected a number in (0, 1)"
            )
        _check_positive_int("line_search_max_iter", line_search_max_iter)
        self.line_search_shrinking_factor = line_search_shrinking_factor
        self.line_search_max_iter = line_search_max_iter
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
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
            _init_setup_model=_init_setup_model,
            **kwargs,
        )

    def apply_step(self, step: NaturalGradientStep, batch: _Batch) -> dict[str, float]:
        result = kl_line_search(
            step.actor_params,
            step.full_step.detach(),
            self._candidate_evaluator(batch, step.actor_params),
            loss0=-step.surrogate,
            expected_improvement=step.expected_improvement.detach(),
            kl_limit=self.target_kl,
            shrinking_factor=self.line_search_shrinking_factor,
            max_iter=self.line_search_max_iter,
        )
        success, objective, kl, backtracks = torch.stack(
            [result.success.float(), -result.loss, result.kl, result.backtracks.float()]
        ).tolist()
        return {
            "policy_objective": objective,
            "kl_divergence_loss": kl,
            "is_line_search_success": success,
            "linesearch_backtracks": backtracks,
        }


class NPG(NaturalGradientAlgorithm):
    """Natural policy gradient (Kakade, 2001) for Stable-Baselines3: TRPO without the line search.

    The CG direction is scaled to the KL radius ``target_kl`` and applied in full,
    ``θ_new = θ_old + sqrt(2δ / sᵀFs) s``; the KL actually reached is logged as
    ``train/kl_divergence_loss`` (it is only approximately δ: nothing backtracks).
    Same arguments as :class:`TRPO` without the line-search ones.

    Example:
        >>> model = NPG("MlpPolicy", "CartPole-v1", seed=0)    # doctest: +SKIP
        >>> model.learn(100_000)                                # doctest: +SKIP
    """

    def apply_step(self, step: NaturalGradientStep, batch: _Batch) -> dict[str, float]:
        new_params = flat_params(step.actor_params) + step.full_step.detach()
        assign_flat_(step.actor_params, new_params)
        with torch.no_grad():
            objective = self._surrogate(batch)
            kl = self._mean_kl(batch)
        policy_objective, kl_value = torch.stack([objective, kl]).tolist()
        return {"policy_objective": policy_objective, "kl_divergence_loss": kl_value}


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r}; expected an integer >= 1")


def _every(observations: Any, k: int) -> Any:
    if isinstance(observations, dict):
        return {key: value[::k] for key, value in observations.items()}
    return observations[::k]
