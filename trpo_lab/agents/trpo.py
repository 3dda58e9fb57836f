"""TRPO (Schulman et al., 2015) on the shared on-policy loop.

One update, on a batch of N valid transitions with advantages Â:

    L(θ)   = 1/N Σ exp(log π_θ(a|s) − log π_old(a|s)) Â  (+ ent_coef · entropy)
    g      = ∇_θ L(θ_old)
    s      ≈ F⁻¹ g            from the curvature backend (``curvature``): conjugate gradient on
                              F·v = ∇²_θ KL(π_old ‖ π_θ) v + damping·v (default), K-FAC, Shampoo
                              or the dense solve (:mod:`trpo_lab.agents.curvature`)
    β      = sqrt(2 δ / sᵀ F s)                      (δ = target_kl, sᵀFs from one F·v product)
    θ_new  = θ_old + αᵏ β s   for the first k with L improved and KL ≤ δ (line search)

The middle three lines are :func:`trpo_lab.optim.trust_region.natural_step`, the last one
:func:`~trpo_lab.optim.trust_region.trust_region_line_search`. The critic is then fitted on
the GAE returns by minibatch Adam, or by full-batch L-BFGS as in the original TRPO paper
(``critic_optimizer``). :class:`TrustRegionAgent` holds everything but the last line, which
NPG replaces by the full step.

Every cross-process reduction goes through ``self.reducer`` (the identity in one process):
the gradient g and the surrogate's value, every F·v product (so CG and sᵀFs), the line-search
losses and KLs and the critic's gradients are sample-weighted means over all ranks' batches;
the K-FAC backend's factors are reduced by the reducer's ``weighted_means``. Every rank then
takes the same step.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping
from operator import itemgetter
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from trpo_lab.agents.base import OnPolicyAgent
from trpo_lab.agents.curvature import (
    Curvature,
    CurvatureProblem,
    ExactCurvature,
    LayerTrace,
    actor_fisher_loss,
    check_exact_size,
    exact_natural_gradient,
    make_curvature,
)
from trpo_lab.agents.metrics import explained_variance
from trpo_lab.config import TRPOConfig, TrustRegionConfig
from trpo_lab.nn.policy import mlp_mse_gradients
from trpo_lab.optim._flat import clip_grad_norm_, flat_params, to_device_async, total_numel
from trpo_lab.optim.exact import cosine_similarity, output_space_fisher
from trpo_lab.optim.fisher import fisher_vector_product, fisher_vector_product_func, flat_grad
from trpo_lab.optim.lbfgs import lbfgs_fixed
from trpo_lab.optim.trust_region import Evaluate, NaturalStep, natural_step, trust_region_line_search
from trpo_lab.rollout.buffer import (
    RolloutBatch,
    flatten_observations,
    map_observations,
    observation_count,
    unflatten_observations,
)

__all__ = ["NaturalStep", "TRPO", "TrustRegionAgent"]

def _make_adam(params: list[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam with the fused kernel where this torch build has it for the parameters' device
    (one kernel for all tensors: the critic's many small steps are overhead-bound)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam(params, lr=lr)


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
            self.critic_optimizer = _make_adam(critic_params, self.current_values["learning_rate"])
        if self.reducer.is_distributed and (cfg.curvature == "exact" or cfg.exact_every):
            raise ValueError(
                f"Invalid curvature {cfg.curvature!r} / diagnostics.exact_every {cfg.exact_every}: the dense "
                "Fisher reference runs in one process only; use curvature 'cg', 'kfac' or 'shampoo' and "
                "exact_every 0 in data-parallel runs"
            )
        if self.policy.trunk_parameters():
            raise ValueError(
                f"Invalid policy_kwargs.share_features_extractor: True for {self.algo.upper()}; its trust region "
                "constrains the actor alone, so actor and critic need their own extractors (set it to false)"
            )
        # K-FAC's factors come from each rank's own states: the reducer combines them.
        self.curvature: Curvature = make_curvature(
            cfg, self.policy.actor_parameters(), nn.ModuleList(self.policy.actor_modules()), self.reducer.weighted_means
        )
        if cfg.exact_every:
            check_exact_size(total_numel(self.policy.actor_parameters()), "diagnostics.exact_every")

    def _optimizer_states(self) -> dict[str, Any]:
        return {"critic": self.critic_optimizer.state_dict(), "curvature": self.curvature.state_dict()}

    def _load_optimizer_states(self, states: Mapping[str, Any]) -> None:
        self.critic_optimizer.load_state_dict(states["critic"])
        self.curvature.load_state_dict(states.get("curvature", {}))

    def _learning_rate_optimizers(self) -> list[Any]:
        # L-BFGS keeps lr = 1 (its line search starts from the quasi-Newton step).
        return [] if self.config.critic_optimizer == "lbfgs" else [self.critic_optimizer]

    # ------------------------------------------------------------------ pieces of the update
    def _advantages(self, batch: RolloutBatch) -> Tensor:
        adv = batch.advantages
        if self.config.normalize_advantage:
            adv = self.reducer.normalize_advantages(adv)
        return adv

    def _surrogate(self, dist_params: Tensor, actions: Tensor, old_log_probs: Tensor, advantages: Tensor) -> Tensor:
        dist = self.policy.distribution
        ratio = torch.exp(dist.log_prob(dist_params, actions) - old_log_probs)
        surrogate = (ratio * advantages).mean()
        ent_coef = self.current_values["ent_coef"]
        if ent_coef > 0:
            surrogate = surrogate + ent_coef * dist.entropy(dist_params).mean()
        return surrogate

    def _fisher_states(self, obs: Any, old_params: Tensor) -> tuple[Any, Tensor]:
        """The states the Fisher is estimated on (every ``sub_sampling_factor``-th) and π_old on them."""
        k = self.config.sub_sampling_factor
        return (map_observations(lambda x: x[::k], obs), old_params[::k]) if k > 1 else (obs, old_params)

    def _fvp(
        self, obs: Tensor, old_params: Tensor, actor_params: list[nn.Parameter], new_params: Tensor | None = None
    ) -> Callable[[Tensor], Tensor]:
        """The damped Fisher-vector product of the mean KL on the (sub-sampled) batch, over all ranks.

        ``new_params``, the distribution parameters already computed with the actor's graph on
        the full batch, is reused (no second forward) when there is no sub-sampling. The
        damping is added once, after the ranks' products are averaged (:meth:`Reducer.fvp`).
        """
        k = self.config.sub_sampling_factor
        obs_sub, old_sub = self._fisher_states(obs, old_params)
        dist, policy = self.policy.distribution, self.policy
        # A plain MLP actor takes the same product by hand, without a graph of the graph.
        local_fvp = policy.actor_fisher_product(obs_sub) if self.config.fvp_backend == "autograd" else None
        if local_fvp is None and self.config.fvp_backend == "func":
            def kl_of(params: tuple[Tensor, ...]) -> Tensor:
                flat = torch.cat([p.reshape(-1) for p in params])
                return dist.kl(old_sub, policy.dist_params_from_flat(flat, obs_sub)).mean()

            local_fvp = fisher_vector_product_func(kl_of, actor_params, damping=0.0)
        elif local_fvp is None:
            def kl_fn() -> Tensor:
                current = new_params if new_params is not None and k == 1 else policy.dist_params(obs_sub)
                return dist.kl(old_sub, current).mean()

            local_fvp = fisher_vector_product(kl_fn, actor_params, damping=0.0)
        total_count = sum(-(-size // k) for size in self.reducer.rank_sizes)  # len(obs[::k]) on every rank
        return self.reducer.fvp(local_fvp, self.config.cg_damping, observation_count(obs_sub), total_count)

    def _curvature_problem(self, obs: Tensor, old_params: Tensor, actor_params: list[nn.Parameter]) -> CurvatureProblem:
        obs_sub, old_sub = self._fisher_states(obs, old_params)
        dist, policy = self.policy.distribution, self.policy

        def kl_of_flat(flat: Tensor) -> Tensor:
            return dist.kl(old_sub, policy.dist_params_from_flat(flat, obs_sub)).mean()

        def fisher_trace() -> tuple[Tensor, list[LayerTrace]]:
            return actor_fisher_loss(policy, obs_sub, self.generator)

        def outputs_of_flat(flat: Tensor, one_obs: Any) -> Tensor:
            return policy.dist_params_from_flat(flat, map_observations(lambda x: x.unsqueeze(0), one_obs)).squeeze(0)

        def divergence(old: Tensor, new: Tensor) -> Tensor:
            return dist.kl(old.unsqueeze(0), new.unsqueeze(0)).squeeze(0)

        theta = flat_params(actor_params)

        def dense_fisher() -> Tensor:
            return output_space_fisher(outputs_of_flat, divergence, theta, obs_sub)

        return CurvatureProblem(
            theta=theta, kl_of_flat=kl_of_flat, fisher_trace=fisher_trace, dense_fisher=dense_fisher
        )

    def _candidate_evaluator(
        self, obs: Tensor, batch: RolloutBatch, advantages: Tensor, old_params: Tensor, old_log_probs: Tensor
    ) -> Evaluate:
        """``(K, P)`` flat actor vectors -> (losses (K,), mean KLs (K,)) over all ranks, without touching the module.

        One candidate is one functional forward; several are the same function under
        ``torch.func.vmap`` (the batched line search).
        """
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
                    losses, kls = loss.unsqueeze(0), kl.unsqueeze(0)
                else:
                    losses, kls = batched(candidates)
            reduced = self.reducer.mean(torch.cat([losses, kls]))  # one bucket for both
            return reduced[: losses.numel()], reduced[losses.numel() :]

        return evaluate

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
        local_grad = flat_grad(surrogate, actor_params, retain_graph=True)
        # g and L(θ_old) over all ranks' samples, one bucket.
        reduced = self.reducer.mean(torch.cat([local_grad, surrogate.detach().reshape(1)]))
        grad, surrogate_value = reduced[:-1], reduced[-1]
        fvp = self._fvp(obs, old_params, actor_params, new_params)
        problem = self._curvature_problem(obs, old_params, actor_params)
        step = natural_step(grad, fvp, self.config.target_kl, solve=self.curvature.solver(problem))
        metrics = {
            "train/surrogate": surrogate_value,
            **{f"train/{key}": value for key, value in step.metrics.items()},
            "train/step_curvature": step.curvature.detach(),
            "train/grad_norm": grad.norm(),
            "train/step_norm": step.full_step.norm(),
        }
        every = self.config.exact_every
        if every and self.num_updates % every == 0:
            is_exact = isinstance(self.curvature, ExactCurvature)
            exact = step.direction if is_exact else exact_natural_gradient(grad, problem, self.config.cg_damping)
            metrics["train/exact_cosine"] = cosine_similarity(step.direction, exact)
        evaluate = self._candidate_evaluator(obs, batch, advantages, old_params, old_log_probs)
        return NaturalStep(step.full_step, step.expected_improvement, -surrogate_value, evaluate, metrics)

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
        # A plain MLP critic on flat features: its gradient by hand (mlp_mse_gradients).
        plain_mlp = policy.flat_features and policy.vf_features_extractor is None and not policy.share_features_extractor
        layers = policy.critic_layers() if plain_mlp else []
        flat_layers = [t for layer in layers for t in layer]
        assert not layers or (len(flat_layers) == len(critic_params) and all(
            a is b for a, b in zip(flat_layers, critic_params, strict=True)))
        losses = []
        # Data-parallel: every rank's rows once, then the same fit on every rank (no collective per step).
        *obs_parts, returns_all = self.reducer.gather([*flatten_observations(obs_all), batch.returns])
        obs_all = unflatten_observations(obs_all, obs_parts)
        reducer = self.reducer.replicated()
        size = returns_all.shape[0]
        for _ in range(cfg.n_critic_updates):
            # One gather per epoch; the minibatches are then contiguous views of it.
            perm = to_device_async(torch.randperm(size, generator=self.shuffle_generator), batch.device)
            obs_epoch, returns_epoch = map_observations(itemgetter(perm), obs_all), returns_all[perm]
            for start, stop, total_count in reducer.minibatch_plan(size, cfg.batch_size):
                obs_mb = map_observations(itemgetter(slice(start, stop)), obs_epoch)
                by_hand = (
                    mlp_mse_gradients(layers, policy.critic_activations, obs_mb, returns_epoch[start:stop])
                    if layers and isinstance(obs_mb, Tensor) else None
                )
                if by_hand is not None:  # the same gradient, without autograd's per-step graph
                    loss, grads = by_hand
                    for param, grad in zip(critic_params, grads, strict=True):
                        param.grad = grad
                else:
                    loss = nn.functional.mse_loss(policy.value(obs_mb), returns_epoch[start:stop])
                    self.critic_optimizer.zero_grad(set_to_none=True)
                    torch.autograd.backward(loss)
                reducer.grads(critic_params, stop - start, total_count)
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
        would mix the two objectives, never enter it. L-BFGS decides on the loss and gradient
        of all ranks' samples (one bucket per evaluation). Logs the value loss after the fit
        and the number of loss evaluations it took.
        """
        policy, optimizer = self.policy, self.critic_optimizer
        critic_params = policy.critic_parameters()
        if self.sync_free:
            return self._fit_critic_lbfgs_fixed(obs, batch)
        optimizer.state.clear()

        def closure() -> float:  # L-BFGS reads the loss on the host anyway
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(policy.value(obs), batch.returns)
            torch.autograd.backward(loss)
            reduced = self.reducer.grads(critic_params, with_means=loss.detach().reshape(1))
            assert reduced is not None
            return float(reduced[0])

        optimizer.step(closure)
        state: dict[str, Any] = next(iter(optimizer.state.values()), {})
        evaluations = state.get("func_evals", 0)
        metrics = self._critic_fit_metrics(obs, batch)
        return {
            **metrics,
            "train/critic_lbfgs_evals": torch.tensor(float(evaluations)),
        }

    def _critic_fit_metrics(self, obs: Any, batch: RolloutBatch) -> dict[str, Tensor]:
        """The value loss after an L-BFGS fit and the explained variance of the rollout's values."""
        with torch.no_grad():
            return {
                "train/value_loss": nn.functional.mse_loss(self.policy.value(obs), batch.returns),
                "train/explained_variance": explained_variance(batch.values, batch.returns),
            }

    def _fit_critic_lbfgs_fixed(self, obs: Tensor, batch: RolloutBatch) -> dict[str, Tensor]:
        """The device-resident L-BFGS fit (``sync_free``): :func:`~trpo_lab.optim.lbfgs.lbfgs_fixed`.

        ``critic_lbfgs_max_iter`` masked quasi-Newton steps with an Armijo test instead of
        torch's strong-Wolfe search, which reads the loss on the host at every evaluation; the
        history (``critic_lbfgs_max_iter`` pairs) starts empty at every fit, as in
        :meth:`_fit_critic_lbfgs`. Logs the loss after the fit and the accepted steps.
        """
        policy, cfg = self.policy, self.config
        critic_params = policy.critic_parameters()

        def loss_and_grad() -> tuple[Tensor, Tensor]:
            for param in critic_params:
                param.grad = None
            with torch.enable_grad():
                loss = nn.functional.mse_loss(policy.value(obs), batch.returns)
                torch.autograd.backward(loss)
            reduced = self.reducer.grads(critic_params, with_means=loss.detach().reshape(1))
            assert reduced is not None
            grad = torch.cat([
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in critic_params
            ])
            return reduced[0], grad

        result = lbfgs_fixed(
            critic_params, loss_and_grad, max_iter=cfg.critic_lbfgs_max_iter, history_size=cfg.critic_lbfgs_max_iter
        )
        for param in critic_params:
            param.grad = None
        metrics = self._critic_fit_metrics(obs, batch)
        return {
            **metrics,
            "train/critic_lbfgs_accepted": result.accepted.to(metrics["train/value_loss"].dtype),
        }

    def update(self, batch: RolloutBatch) -> dict[str, Tensor]:
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
        return {key: value.detach() for key, value in metrics.items()}


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
        options = cfg.line_search_options
        if self.sync_free:  # all candidates in one vmapped pass, chosen on the device
            options["batched"] = True
        result = trust_region_line_search(self.policy.actor_parameters(), step, **options)
        return {
            "train/kl": result.kl,
            "train/linesearch_success": result.success.float(),
            "train/linesearch_backtracks": result.backtracks.float(),
            "train/step_fraction": result.step_fraction,
            "train/expected_improvement": result.expected_improvement,
            "train/actual_improvement": result.actual_improvement,
        }

