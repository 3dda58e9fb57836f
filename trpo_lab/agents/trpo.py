"""TRPO (Schulman et al., 2015) on the shared on-policy loop.

One update, on a batch of N valid transitions with advantages Â:

    L(θ)   = 1/N Σ exp(log π_θ(a|s) − log π_old(a|s)) Â  (+ ent_coef · entropy)
    g      = ∇_θ L(θ_old)
    s      ≈ F⁻¹ g            from the curvature backend (``curvature``): conjugate gradient on
                              F·v = ∇²_θ KL(π_old ‖ π_θ) v + damping·v (default), K-FAC, Shampoo
                              or the dense solve (:mod:`trpo_lab.agents.curvature`)
    β      = sqrt(2 δ / sᵀ F s)                      (δ = target_kl, sᵀFs from one F·v product)
    θ_new  = θ_old + αᵏ β s   for the first k with L improved and KL ≤ δ (line search)

The critic is then fitted on the GAE returns by minibatch Adam, or by full-batch L-BFGS as in
the original TRPO paper (``critic_optimizer``).  :class:`TrustRegionAgent` holds everything but
the last line, which NPG replaces by the full step.

Data-parallel (``dist=``, issue #8): the gradient g and the surrogate's value, every F·v
product (so CG and sᵀFs), the line-search losses and KLs and the critic's gradients are
sample-weighted means over all ranks' batches, each one all-reduce of one flat bucket; the
K-FAC backend's factors are reduced by KFAC's ``statistics_reducer``. Every rank then takes
the same step.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from trpo_lab.agents.base import OnPolicyAgent
from trpo_lab.agents.curvature import (
    Curvature,
    CurvatureProblem,
    ExactCurvature,
    KFACCurvature,
    check_exact_size,
    exact_natural_gradient,
    make_curvature,
)
from trpo_lab.buffer import RolloutBatch
from trpo_lab.config import TRPOConfig, TrustRegionConfig
from trpo_lab.optim._flat import clip_grad_norm_, flat_params, total_numel
from trpo_lab.optim.exact import cosine_similarity
from trpo_lab.optim.fisher import fisher_vector_product, fisher_vector_product_func, flat_grad
from trpo_lab.optim.line_search import kl_line_search
from trpo_lab.optim.trust_region import scale_to_kl_radius

__all__ = ["TrustRegionAgent", "TRPO", "NaturalStep", "explained_variance", "make_adam"]


def make_adam(params: list[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam with the fused kernel where this torch build has it for the parameters' device
    (one kernel for all tensors: the critic's many small steps are overhead-bound)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam(params, lr=lr)


def explained_variance(predictions: Tensor, targets: Tensor) -> Tensor:
    """1 − Var[y − ŷ] / Var[y] (NaN when Var[y] = 0)."""
    var_y = targets.var()
    return 1.0 - (targets - predictions).var() / var_y


class NaturalStep:
    """The natural-gradient step of one update, before it is applied."""

    def __init__(
        self, full_step: Tensor, expected_improvement: Tensor, loss0: Tensor, metrics: dict[str, Tensor]
    ) -> None:
        self.full_step = full_step
        self.expected_improvement = expected_improvement
        self.loss0 = loss0
        self.metrics = metrics


class TrustRegionAgent(OnPolicyAgent):
    """Shared machinery of TRPO and NPG: surrogate, natural direction, KL scaling, critic fit."""

    config_class: ClassVar[type[TrustRegionConfig]] = TrustRegionConfig
    config: TrustRegionConfig

    def _setup(self) -> None:
        cfg, critic_params = self.config, self.policy.critic_parameters()
        self.critic_optimizer: torch.optim.Optimizer
        if cfg.critic_optimizer == "lbfgs":
            # One full-batch solve per update, as scipy's L-BFGS in the original TRPO code.
            # lr = 1: the strong-Wolfe search starts from the quasi-Newton step itself.
            # history_size = max_iter: every curvature pair of a fit is kept (the history is
            # reset at each fit, see _fit_critic_lbfgs, so a longer one could never fill).
            self.critic_optimizer = torch.optim.LBFGS(
                critic_params,
                lr=1.0,
                max_iter=cfg.critic_lbfgs_max_iter,
                history_size=cfg.critic_lbfgs_max_iter,
                line_search_fn="strong_wolfe",
            )
        else:
            self.critic_optimizer = make_adam(critic_params, cfg.learning_rate)
        self.curvature: Curvature = make_curvature(self.policy, cfg, self.generator)
        if cfg.exact_every:
            check_exact_size(total_numel(self.policy.actor_parameters()), "diagnostics.exact_every")
        if self.dist is not None:
            if cfg.curvature == "exact" or cfg.exact_every:
                raise ValueError(
                    f"Invalid curvature {cfg.curvature!r} / diagnostics.exact_every {cfg.exact_every}: the dense "
                    "Fisher reference runs in one process only; use curvature 'cg', 'kfac' or 'shampoo' and "
                    "exact_every 0 in data-parallel runs"
                )
            if isinstance(self.curvature, KFACCurvature):  # its factors come from each rank's own states
                self.curvature.kfac.statistics_reducer = self.dist.weighted_means

    def _optimizer_states(self) -> dict[str, Any]:
        return {"critic": self.critic_optimizer.state_dict(), "curvature": self.curvature.state_dict()}

    def _load_optimizer_states(self, states: dict[str, Any]) -> None:
        self.critic_optimizer.load_state_dict(states["critic"])
        self.curvature.load_state_dict(states.get("curvature", {}))

    # ------------------------------------------------------------------ pieces of the update
    def _advantages(self, batch: RolloutBatch) -> Tensor:
        adv = batch.advantages
        if self.config.normalize_advantage:
            adv = self._normalize_advantages(adv)
        return adv

    def _surrogate(self, dist_params: Tensor, actions: Tensor, old_log_probs: Tensor, advantages: Tensor) -> Tensor:
        dist = self.policy.distribution
        ratio = torch.exp(dist.log_prob(dist_params, actions) - old_log_probs)
        surrogate = (ratio * advantages).mean()
        if self.config.ent_coef > 0:
            surrogate = surrogate + self.config.ent_coef * dist.entropy(dist_params).mean()
        return surrogate

    def _fvp(
        self, obs: Tensor, old_params: Tensor, actor_params: list[nn.Parameter], new_params: Tensor | None = None
    ) -> Any:
        """The damped Fisher-vector product of the mean KL on the (sub-sampled) batch.

        ``new_params``, the distribution parameters already computed with the actor's graph on
        the full batch, is reused (no second forward) when there is no sub-sampling.
        """
        k = self.config.sub_sampling_factor
        obs_sub, old_sub = (obs[::k], old_params[::k]) if k > 1 else (obs, old_params)
        dist, policy = self.policy.distribution, self.policy
        # Data-parallel: the damping is added once, after the ranks' products are averaged.
        damping = self.config.cg_damping if self.dist is None else 0.0
        fvp: Callable[[Tensor], Tensor]
        if self.config.fvp_backend == "func":
            def kl_of(params: tuple[Tensor, ...]) -> Tensor:
                flat = torch.cat([p.reshape(-1) for p in params])
                return dist.kl(old_sub, policy.dist_params_from_flat(flat, obs_sub)).mean()

            fvp = fisher_vector_product_func(kl_of, actor_params, damping=damping)
        else:
            def kl_fn() -> Tensor:
                current = new_params if new_params is not None and k == 1 else policy.dist_params(obs_sub)
                return dist.kl(old_sub, current).mean()

            fvp = fisher_vector_product(kl_fn, actor_params, damping=damping)
        return fvp if self.dist is None else self._fvp_over_ranks(fvp, obs_sub.shape[0])

    def _fvp_over_ranks(self, local_fvp: Callable[[Tensor], Tensor], local_count: int) -> Callable[[Tensor], Tensor]:
        """v ↦ (Σ_r w_r H_r + γI) v with H_r rank r's KL Hessian on its (sub-sampled) states and
        w_r its share of all of them: one all-reduce of P numbers per product."""
        assert self.dist is not None
        k, damping, dist = self.config.sub_sampling_factor, self.config.cg_damping, self.dist
        total_count = sum(-(-size // k) for size in self._rank_sizes)  # len(obs[::k]) on every rank

        def fvp(vector: Tensor) -> Tensor:
            return dist.weighted_mean(local_fvp(vector), local_count, total_count) + damping * vector

        return fvp

    def _curvature_problem(
        self, obs: Tensor, old_params: Tensor, actor_params: list[nn.Parameter], grad: Tensor, fvp: Any
    ) -> CurvatureProblem:
        k = self.config.sub_sampling_factor
        obs_sub, old_sub = (obs[::k], old_params[::k]) if k > 1 else (obs, old_params)
        dist, policy = self.policy.distribution, self.policy

        def kl_of_flat(flat: Tensor) -> Tensor:
            return dist.kl(old_sub, policy.dist_params_from_flat(flat, obs_sub)).mean()

        return CurvatureProblem(
            grad=grad, fvp=fvp, kl_of_flat=kl_of_flat, theta=flat_params(actor_params), fisher_obs=obs_sub
        )

    def natural_step(self, obs: Tensor, batch: RolloutBatch, advantages: Tensor) -> NaturalStep:
        """Take s from the curvature backend and scale it to the KL radius: β s, β = sqrt(2δ / sᵀFs).

        With ``diagnostics.exact_every = N`` every N-th update (the first included) also logs
        ``train/exact_cosine``, the cosine between s and the exact (F + damping·I)⁻¹ g.
        """
        policy = self.policy
        actor_params = policy.actor_parameters()
        # One forward serves the surrogate, the old distribution (its detached value: the
        # actor has not moved yet) and the KL whose Hessian is the Fisher.
        new_params = policy.dist_params(obs)
        old_params = new_params.detach()
        old_log_probs = policy.distribution.log_prob(old_params, batch.actions)
        surrogate = self._surrogate(new_params, batch.actions, old_log_probs, advantages)
        grad = flat_grad(surrogate, actor_params, retain_graph=True)
        if self.dist is not None:  # g and L(θ_old) over all ranks' samples, one bucket
            reduced = self._global_mean(torch.cat([grad, surrogate.detach().reshape(1)]))
            grad, surrogate = reduced[:-1], reduced[-1]
        fvp = self._fvp(obs, old_params, actor_params, new_params)
        problem = self._curvature_problem(obs, old_params, actor_params, grad, fvp)
        direction, direction_metrics = self.curvature.direction(problem)
        product = self.curvature.direction_product()
        curvature = torch.dot(direction, product if product is not None else fvp(direction))
        full_step = scale_to_kl_radius(direction, curvature, self.config.target_kl)
        metrics = {
            "train/surrogate": surrogate.detach(),
            **direction_metrics,
            "train/step_curvature": curvature.detach(),
            "train/grad_norm": grad.norm(),
            "train/step_norm": full_step.norm(),
        }
        every = self.config.exact_every
        if every and self.num_updates % every == 0:
            is_exact = isinstance(self.curvature, ExactCurvature)
            exact = direction if is_exact else exact_natural_gradient(problem, self.config.cg_damping)
            metrics["train/exact_cosine"] = cosine_similarity(direction, exact)
        self._old = (old_params, old_log_probs)
        return NaturalStep(full_step, torch.dot(grad, full_step), -surrogate.detach(), metrics)

    def _evaluate_candidates(self, obs: Tensor, batch: RolloutBatch, advantages: Tensor) -> Any:
        """``(K, P)`` flat actor vectors -> (losses (K,), mean KLs (K,)), without touching the module."""
        old_params, old_log_probs = self._old
        policy, dist = self.policy, self.policy.distribution

        def one(flat: Tensor) -> tuple[Tensor, Tensor]:
            params = policy.dist_params_from_flat(flat, obs)
            loss = -self._surrogate(params, batch.actions, old_log_probs, advantages)
            return loss, dist.kl(old_params, params).mean()

        batched = torch.func.vmap(one)

        def evaluate(candidates: Tensor) -> tuple[Tensor, Tensor]:
            with torch.no_grad():
                if candidates.shape[0] == 1:
                    loss, kl = one(candidates[0])
                    return loss.unsqueeze(0), kl.unsqueeze(0)
                return batched(candidates)

        if self.dist is None:
            return evaluate

        def evaluate_over_ranks(candidates: Tensor) -> tuple[Tensor, Tensor]:
            losses, kls = evaluate(candidates)
            reduced = self._global_mean(torch.cat([losses, kls]))  # one bucket for both
            return reduced[: losses.numel()], reduced[losses.numel() :]

        return evaluate_over_ranks

    @abstractmethod
    def apply_step(self, step: NaturalStep, obs: Tensor, batch: RolloutBatch, advantages: Tensor) -> dict[str, Tensor]:
        """Apply the scaled natural step to the actor (TRPO: line search; NPG: full step)."""

    def fit_critic(self, batch: RolloutBatch) -> dict[str, Tensor]:
        """Regress V(s) on the GAE returns: minibatch Adam for ``n_critic_updates`` epochs, or full-batch L-BFGS."""
        policy, cfg = self.policy, self.config
        obs_all = policy.preprocess(batch.observations)
        if cfg.critic_optimizer == "lbfgs":
            return self._fit_critic_lbfgs(obs_all, batch)
        critic_params = policy.critic_parameters()
        losses = []
        for _ in range(cfg.n_critic_updates):
            # One gather per epoch; the minibatches are then contiguous views of it.
            perm = torch.randperm(batch.size, generator=self.shuffle_generator).to(obs_all.device)
            obs_epoch, returns_epoch = obs_all[perm], batch.returns[perm]
            for start, stop, total_count in self._minibatch_plan(batch.size, cfg.batch_size):
                loss = nn.functional.mse_loss(policy.value(obs_epoch[start:stop]), returns_epoch[start:stop])
                self.critic_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self._all_reduce_grads(critic_params, stop - start, total_count)
                clip_grad_norm_(critic_params, cfg.max_grad_norm)
                self.critic_optimizer.step()
                losses.append(loss.detach())
        with torch.no_grad():
            ev = explained_variance(batch.values, batch.returns)
        return {"train/value_loss": torch.stack(losses).mean(), "train/explained_variance": ev}

    def _fit_critic_lbfgs(self, obs: Tensor, batch: RolloutBatch) -> dict[str, Tensor]:
        """One ``torch.optim.LBFGS`` solve (strong-Wolfe line search) of the full-batch MSE.

        The history starts empty at every fit, as the original TRPO code's fresh scipy L-BFGS
        call per batch: curvature pairs from the previous batch's objective, and the pair that
        would mix the two objectives, never enter it. Logs the value loss after the fit and the
        number of loss evaluations it took.
        """
        policy, optimizer = self.policy, self.critic_optimizer
        optimizer.state.clear()

        def closure() -> Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(policy.value(obs), batch.returns)
            loss.backward()
            if self.dist is not None:  # L-BFGS decides on the loss and gradient of all ranks' samples
                self._all_reduce_grads(policy.critic_parameters())
                return self._global_mean(loss.detach())
            return loss

        optimizer.step(closure)
        evaluations = next(iter(optimizer.state.values()), {}).get("func_evals", 0)
        with torch.no_grad():
            loss = nn.functional.mse_loss(policy.value(obs), batch.returns)
            ev = explained_variance(batch.values, batch.returns)
        return {
            "train/value_loss": loss,
            "train/explained_variance": ev,
            "train/critic_lbfgs_evals": torch.tensor(float(evaluations)),
        }

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        obs = self.policy.preprocess(batch.observations)
        advantages = self._advantages(batch)
        step = self.natural_step(obs, batch, advantages)
        metrics = dict(step.metrics)
        metrics.update(self.apply_step(step, obs, batch, advantages))
        metrics.update(self.fit_critic(batch))
        with torch.no_grad():
            metrics["train/entropy"] = self.policy.distribution.entropy(self.policy.dist_params(obs)).mean()
            if self.policy.log_std is not None:
                metrics["train/std"] = self.policy.log_std.exp().mean()
        self._old = None  # type: ignore[assignment]
        keys = list(metrics)
        values = torch.stack([metrics[k].detach().float().reshape(()) for k in keys]).cpu().tolist()
        return dict(zip(keys, values))


class TRPO(TrustRegionAgent):
    """Trust Region Policy Optimization (Schulman et al., 2015), sb3-contrib hyperparameter names.

    Example:
        >>> agent = TRPO("CartPole-v1", n_envs=8, seed=0, n_steps=256)   # doctest: +SKIP
        >>> agent.learn(100_000, run_dir="runs/cartpole-trpo")           # doctest: +SKIP
    """

    algo: ClassVar[str] = "trpo"
    config_class: ClassVar[type[TRPOConfig]] = TRPOConfig
    config: TRPOConfig

    def apply_step(self, step: NaturalStep, obs: Tensor, batch: RolloutBatch, advantages: Tensor) -> dict[str, Tensor]:
        cfg = self.config
        result = kl_line_search(
            self.policy.actor_parameters(),
            step.full_step.detach(),
            self._evaluate_candidates(obs, batch, advantages),
            loss0=step.loss0,
            expected_improvement=step.expected_improvement.detach(),
            kl_limit=cfg.target_kl,
            shrinking_factor=cfg.line_search_shrinking_factor,
            max_iter=cfg.line_search_max_iter,
            accept_ratio=cfg.line_search_accept_ratio,
            batched=cfg.line_search_batched,
        )
        return {
            "train/kl": result.kl,
            "train/linesearch_success": result.success.float(),
            "train/linesearch_backtracks": result.backtracks.float(),
            "train/step_fraction": result.step_fraction,
            "train/expected_improvement": result.expected_improvement,
            "train/actual_improvement": result.actual_improvement,
        }
