"""PPO (Schulman et al., 2017) on the shared on-policy loop.

For ``n_epochs`` passes over shuffled minibatches of the rollout, with one optimizer over
the actor and the critic (as Stable-Baselines3):

    r(θ)     = exp(log π_θ(a|s) − log π_old(a|s))
    L_policy = −1/B Σ min(r Â, clip(r, 1 − ε, 1 + ε) Â)          (Â normalized per minibatch)
    V_clip   = V_old + clip(V_θ − V_old, −ε_v, ε_v)               (only with clip_range_vf)
    L_value  = 1/B Σ (R − V_clip)²
    L        = L_policy + vf_coef · L_value − ent_coef · 1/B Σ H[π_θ(·|s)]

The optional early stop follows SB3: before each gradient step, the minibatch estimate
KL ≈ 1/B Σ (r − 1 − log r) (Schulman's k3 estimator) is compared to ``1.5 · target_kl``.

Data-parallel (``dist=``), through the agent's :class:`~trpo_lab.distributed.Reducer`: every
rank steps through the same number of minibatches (``reducer.shuffled_minibatches``), the
advantages are normalized with each minibatch's statistics over all ranks, and the early-stop
KL travels in the gradients' bucket (one all-reduce per minibatch step,
``reducer.grads(..., with_means=approx_kl)``), so every rank takes the same optimizer step.
In one process each of these is the local computation.

With ``compile = true`` each minibatch's advantage normalization, loss, gradient and (in one
process) gradient clip run as one ``torch.compile`` graph (:func:`minibatch_ppo_loss`), compiled
at the first update with dynamic shapes; where compiling fails the agent warns once and runs
eager. The arithmetic is the eager one's, rounded differently.

After the epochs the update reports what it did to the policy: ``train/kl``, the exact mean
KL(π_old ‖ π_new), and ``train/entropy``, from a forward of the rollout before the epochs
and one after. They are metrics only (the early stop uses the minibatches' estimate), and
with ``kl_batch_size = m`` both forwards take ``m`` samples drawn at random each update:
an unbiased estimate for ``m / batch`` of their cost. On the Nature CNN at 1,024 frames
they were 0.7 s of a 3.8 s update on one CPU core.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from trpo_lab.agents.base import OnPolicyAgent
from trpo_lab.agents.metrics import explained_variance, kl_sample, update_seed
from trpo_lab.config import PPOConfig
from trpo_lab.distributed.reducer import standardize
from trpo_lab.nn.policy import ActorCritic
from trpo_lab.optim._flat import clip_grad_norm_, clip_grads_
from trpo_lab.rollout.buffer import Observations, RolloutBatch

__all__ = ["PPO", "PPOLoss", "PPOGradient", "ppo_loss", "ppo_loss_by_hand", "minibatch_ppo_loss", "optimizer_class"]

_TORCH_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
}


class PPOLoss(NamedTuple):
    """The terms of the PPO objective on one minibatch (every field is a 0-dim tensor).

    Attributes:
        total: ``policy + vf_coef · value − ent_coef · entropy``, the quantity minimised.
        policy: The clipped surrogate loss ``L_policy``.
        value: The (optionally clipped) value regression loss ``L_value``.
        entropy: Mean entropy of the current policy on the minibatch.
        approx_kl: ``mean(r − 1 − log r)``, detached (an unbiased, non-negative KL estimate).
        clip_fraction: Fraction of samples with ``|r − 1| > clip_range``, detached.
    """

    total: Tensor
    policy: Tensor
    value: Tensor
    entropy: Tensor
    approx_kl: Tensor
    clip_fraction: Tensor


def ppo_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    entropy: Tensor,
    *,
    clip_range: float,
    clip_range_vf: float | None = None,
    vf_coef: float = 0.5,
    ent_coef: float = 0.0,
) -> PPOLoss:
    """The PPO objective of one minibatch (see the module docstring for the equations).

    Args:
        log_probs: ``log π_θ(a|s)`` under the current parameters, ``(B,)``, with grad.
        old_log_probs: ``log π_old(a|s)`` recorded during the rollout, ``(B,)``.
        advantages: ``Â``, ``(B,)``, already normalized if that is wanted.
        values: ``V_θ(s)``, ``(B,)``, with grad.
        old_values: ``V_old(s)`` recorded during the rollout, ``(B,)``.
        returns: The regression targets ``R`` (GAE returns), ``(B,)``.
        entropy: Per-sample entropy of ``π_θ(·|s)``, ``(B,)``.
        clip_range: ε of the ratio clip.
        clip_range_vf: ε_v of the value clip, or ``None`` for the unclipped value loss.
            As in SB3 the prediction is clipped around ``V_old`` and only the clipped
            prediction is regressed (no max with the unclipped loss).
        vf_coef: Weight of the value loss.
        ent_coef: Weight of the entropy bonus.
    """
    return _ppo_terms(log_probs, old_log_probs, advantages, values, old_values, returns, entropy, clip_range,
                      clip_range_vf, vf_coef, ent_coef).loss


class _Terms(NamedTuple):
    """:func:`ppo_loss` and the intermediates its derivatives are written from."""

    loss: PPOLoss
    unclipped: Tensor  # r Â
    clipped: Tensor  # clip(r, 1 − ε, 1 + ε) Â
    residual: Tensor  # R − V_clip
    value_moved: Tensor | None  # V − V_old, with the value clip only


def _ppo_terms(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    entropy: Tensor,
    clip_range: float,
    clip_range_vf: float | None,
    vf_coef: float,
    ent_coef: float,
) -> _Terms:
    log_ratio = log_probs - old_log_probs
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * advantages
    policy_loss = -torch.min(unclipped, clipped).mean()
    moved = None
    if clip_range_vf is not None:
        moved = values - old_values
        values = old_values + torch.clamp(moved, -clip_range_vf, clip_range_vf)
    residual = returns - values
    value_loss = residual.square().mean()
    mean_entropy = entropy.mean()
    total = policy_loss + vf_coef * value_loss - ent_coef * mean_entropy
    with torch.no_grad():
        approx_kl = ((ratio - 1.0) - log_ratio).mean()
        clip_fraction = ((ratio - 1.0).abs() > clip_range).to(ratio.dtype).mean()
    loss = PPOLoss(total, policy_loss, value_loss, mean_entropy, approx_kl, clip_fraction)
    return _Terms(loss, unclipped, clipped, residual, moved)


def ppo_loss_by_hand(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    entropy: Tensor,
    *,
    clip_range: float,
    clip_range_vf: float | None = None,
    vf_coef: float = 0.5,
    ent_coef: float = 0.0,
) -> tuple[PPOLoss, Tensor, Tensor, Tensor]:
    """:func:`ppo_loss` of graph-free inputs and its gradient with respect to ``log_probs``,
    ``entropy`` and ``values`` (per sample), the derivatives written out.

    ``∂L/∂ log π_i = −Â_i r_i / B`` where ``min`` takes the unclipped term (a tie, inside the
    clip range, counts as unclipped: autograd splits it between two equal derivatives), 0
    where it takes the clipped one, whose ratio is then outside the range;
    ``∂L/∂V_i = 2 vf_coef (V_clip,i − R_i) / B`` (times 1 where ``V − V_old`` is inside
    ``±ε_v``, else 0); ``∂L/∂H_i = −ent_coef / B``. Tested equal to autograd's gradient of
    :func:`ppo_loss`. (One difference, on a set of measure zero: a ratio that rounds to exactly
    ``1 ± ε`` gets the full unclipped derivative, where autograd may give half of it.)

    Returns:
        ``(loss, grad_log_probs, grad_entropy, grad_values)``.
    """
    with torch.no_grad():
        terms = _ppo_terms(log_probs, old_log_probs, advantages, values, old_values, returns, entropy, clip_range,
                           clip_range_vf, vf_coef, ent_coef)
        count = log_probs.shape[0]
        value_scale: float | Tensor = 2.0 * vf_coef / count
        if clip_range_vf is not None and terms.value_moved is not None:
            value_scale = terms.value_moved.abs().le(clip_range_vf).to(values.dtype).mul_(value_scale)
        unclipped = terms.unclipped
        grad_log_probs = unclipped.le(terms.clipped).to(unclipped.dtype).mul_(unclipped).mul_(-1.0 / count)
        grad_values = terms.residual.neg().mul_(value_scale)
        grad_entropy = torch.full_like(entropy, -ent_coef / count)
    return terms.loss, grad_log_probs, grad_entropy, grad_values


class PPOGradient(NamedTuple):
    """A minibatch's :class:`PPOLoss` (detached) and the gradient of its total, as
    ``(parameter, gradient)`` pairs; with ``grad_norm``, the gradient is already clipped to
    ``max_grad_norm`` and ``grad_norm`` is its norm before (:func:`minibatch_ppo_loss`)."""

    loss: PPOLoss
    grads: list[tuple[Tensor, Tensor]]
    grad_norm: Tensor | None = None


def minibatch_ppo_loss(
    policy: ActorCritic,
    obs: Any,
    actions: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    old_values: Tensor,
    returns: Tensor,
    by_hand: bool = False,
    *,
    clip_range: float,
    clip_range_vf: float | None = None,
    vf_coef: float = 0.5,
    ent_coef: float = 0.0,
    normalize_advantage: bool = False,
    max_grad_norm: float | None = None,
) -> PPOLoss | PPOGradient:
    """:func:`ppo_loss` of ``policy`` on one minibatch of preprocessed ``obs``.

    With ``by_hand``, where the policy has a graph-free forward
    (:meth:`~trpo_lab.nn.policy.ActorCritic.dist_params_and_value_by_hand`), the
    :class:`PPOGradient` instead: the loss and every parameter's gradient, the chain rule
    written out (:func:`ppo_loss_by_hand`; autograd from the loss to the networks' outputs
    where the distribution's derivatives are not written). Otherwise the loss, with its graph.

    ``normalize_advantage`` standardizes ``advantages`` over the minibatch first, and
    ``max_grad_norm`` clips a :class:`PPOGradient` as ``clip_grad_norm_`` would (its
    ``grad_norm`` is the norm before): the agent asks for both here in one process, and
    does them itself over all ranks when data-parallel. A pure function of its inputs, so
    ``torch.compile`` can take it whole (``compile = true``).
    """
    dist = policy.distribution
    if normalize_advantage:
        advantages = standardize(advantages)
    terms: dict[str, Any] = {"clip_range": clip_range, "clip_range_vf": clip_range_vf, "vf_coef": vf_coef,
                             "ent_coef": ent_coef}
    forward = policy.dist_params_and_value_by_hand(obs) if by_hand else None
    if forward is None:
        params, values = policy.dist_params_and_value(obs)
    else:
        params, values, backward = forward
    written = dist.log_prob_entropy_by_hand(params, actions) if forward is not None else None
    if forward is not None and written is not None:
        log_probs, entropy, vjp = written
        loss, grad_log_probs, grad_entropy, grad_values = ppo_loss_by_hand(
            log_probs, old_log_probs, advantages, values, old_values, returns, entropy, **terms
        )
        return _clipped(PPOGradient(loss, backward(vjp(grad_log_probs, grad_entropy), grad_values)), max_grad_norm)
    if forward is not None:
        params, values = params.requires_grad_(), values.detach().requires_grad_()
    loss = ppo_loss(dist.log_prob(params, actions), old_log_probs, advantages, values, old_values, returns,
                    dist.entropy(params), **terms)
    if forward is None:
        return loss
    grad_params, grad_values = torch.autograd.grad(loss.total, (params, values), materialize_grads=True)
    return _clipped(PPOGradient(loss, backward(grad_params, grad_values)), max_grad_norm)


def _clipped(gradient: PPOGradient, max_grad_norm: float | None) -> PPOGradient:
    if max_grad_norm is None:
        return gradient
    return gradient._replace(grad_norm=clip_grads_([grad for _, grad in gradient.grads], max_grad_norm))


_IMPORTABLE_PACKAGES = ("torch.optim", "trpo_lab.optim")


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class for ``PPOConfig.optimizer``.

    ``"adam"``, ``"adamw"``, ``"sgd"``, ``"rmsprop"``, ``"shampoo"`` (``trpo_lab.optim.shampoo``,
    imported only when asked for) or a dotted path to a ``torch.optim.Optimizer`` subclass.

    Raises:
        ValueError: unknown name, a path that does not import, or a class that is no optimizer.
    """
    key = name.lower()
    if key in _TORCH_OPTIMIZERS:
        return _TORCH_OPTIMIZERS[key]
    if key == "shampoo":
        module_name, class_name = "trpo_lab.optim.shampoo", "Shampoo"
    else:
        module_name, _, class_name = name.rpartition(".")
    # Importing runs a module's code: only torch's and our own optimizer modules may be named
    # (a preset or checkpoint config must not make us import arbitrary packages).
    if module_name and not any(
        module_name == package or module_name.startswith(package + ".") for package in _IMPORTABLE_PACKAGES
    ):
        raise ValueError(
            f"Invalid optimizer: {name!r}; dotted paths must name a class in {' or '.join(_IMPORTABLE_PACKAGES)}"
        )
    if not module_name:
        raise ValueError(f"Invalid optimizer: {name!r}; expected one of {', '.join(_TORCH_OPTIMIZERS)}, shampoo "
                         "or a dotted torch.optim.Optimizer class path")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"Invalid optimizer: {name!r} cannot be imported ({exc})") from exc
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"Invalid optimizer: {name!r} is not a torch.optim.Optimizer subclass")
    return cls


class PPO(OnPolicyAgent):
    """Proximal Policy Optimization with the clipped surrogate (Schulman et al., 2017), SB3 names.

    Example:
        >>> agent = PPO("CartPole-v1", n_envs=8, seed=0, n_steps=32, batch_size=256)  # doctest: +SKIP
        >>> agent.learn(100_000, run_dir="runs/cartpole-ppo")                         # doctest: +SKIP
    """

    algo: ClassVar[str] = "ppo"
    config_class: ClassVar[type[PPOConfig]] = PPOConfig
    config: PPOConfig

    def _setup(self) -> None:
        cls = optimizer_class(self.config.optimizer)
        kwargs = dict(self.config.optimizer_kwargs)
        if cls in (torch.optim.Adam, torch.optim.AdamW) and not {"fused", "foreach"} & set(kwargs):
            # One fused kernel for all parameters: PPO's many small minibatch steps are overhead-bound.
            kwargs["fused"] = True
        try:
            self.optimizer = cls(self.policy.parameters(), **{"lr": self.current_values["learning_rate"], **kwargs})
        except TypeError as exc:
            raise ValueError(
                f"Invalid optimizer_kwargs {self.config.optimizer_kwargs} for {cls.__name__}: {exc}"
            ) from exc
        # (torch.compile wraps lazily: the first minibatch compiles; dynamic shapes, so a short last
        # minibatch or a scheduled clip range does not compile again)
        self._compiled_loss = torch.compile(minibatch_ppo_loss, dynamic=True) if self.config.compile else None
        self._compiled_loss_ran = False

    def _optimizer_states(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def _load_optimizer_states(self, states: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(states["optimizer"])

    def _learning_rate_optimizers(self) -> list[Any]:
        return [self.optimizer]

    def _minibatch_loss(
        self, minibatch: RolloutBatch, obs: Any, by_hand: bool = False, clip: bool = False
    ) -> PPOLoss | PPOGradient:
        """The minibatch's :func:`ppo_loss` of preprocessed ``obs`` (:func:`minibatch_ppo_loss`;
        with ``by_hand``, its :class:`PPOGradient` where the policy has a hand-written one),
        through ``torch.compile`` with ``compile = true``. In one process the advantages are
        normalized inside it, and with ``clip`` a :class:`PPOGradient` comes clipped to
        ``max_grad_norm``; data-parallel, the advantages are normalized over all ranks first
        and the caller clips after the gradients' all-reduce.

        A first compiled call that fails (no C++ compiler, say) warns once and leaves the
        agent on the eager path; a later failure is the loss's own, and raises.
        """
        cfg = self.config
        advantages = minibatch.advantages
        local = not self.reducer.is_distributed
        if cfg.normalize_advantage and not local:
            advantages = self.reducer.normalize_advantages(advantages)
        args = (self.policy, obs, minibatch.actions, minibatch.log_probs, advantages, minibatch.values,
                minibatch.returns, by_hand)
        terms: dict[str, Any] = {
            "clip_range": self.current_values["clip_range"],
            "clip_range_vf": cfg.clip_range_vf,
            "vf_coef": cfg.vf_coef,
            "ent_coef": self.current_values["ent_coef"],
            "normalize_advantage": cfg.normalize_advantage and local,
            "max_grad_norm": cfg.max_grad_norm if clip and local else None,
        }
        if self._compiled_loss is not None:
            try:
                result = self._compiled_loss(*args, **terms)
            except Exception as error:
                if self._compiled_loss_ran:
                    raise
                lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
                detail = next((line for line in lines[1:] if "error:" in line.lower()), "")  # a compiler's message
                warnings.warn(
                    f"PPO: torch.compile failed ({type(error).__name__}: {lines[0]}"
                    f"{'; ' + detail if detail else ''}); the minibatch steps run uncompiled (set compile = false "
                    "to silence this)",
                    RuntimeWarning, stacklevel=2,
                )
                self._compiled_loss = None
            else:
                self._compiled_loss_ran = True
                return result
        return minibatch_ppo_loss(*args, **terms)

    def _update_sync_free(self, batch: RolloutBatch) -> dict[str, Tensor | float]:
        """:meth:`update` with the ``target_kl`` early stop decided on the device.

        Every minibatch of every epoch runs; once a minibatch's approximate KL exceeds
        ``1.5 * target_kl``, its optimizer step and those of all later minibatches are undone
        (parameters and optimizer state restored with ``torch.where``), so the result is the
        early-stopped update's. The metrics average over the steps kept. No host
        synchronisation; the rest of the epochs' compute is the price of deciding without one.
        (The first minibatch of an update sees KL 0, the policy not having moved, so the lazily
        created optimizer state is never created by a step that is undone.)
        """
        cfg, policy, reducer = self.config, self.policy, self.reducer
        assert cfg.target_kl is not None
        parameters = list(policy.parameters())
        obs = policy.preprocess(batch.observations)
        kl_obs, _ = kl_sample(obs, batch.size, cfg.kl_batch_size, update_seed(self.local_seed, self.num_updates))
        with torch.no_grad():
            old_params = policy.dist_params(kl_obs)
        stopped = torch.zeros((), dtype=torch.bool, device=batch.device)
        kept: list[Tensor] = []
        losses: list[PPOLoss] = []
        grad_norms: list[Tensor] = []
        epochs_done = torch.zeros((), device=batch.device)
        for _ in range(cfg.n_epochs):
            for minibatch, total_count in reducer.shuffled_minibatches(batch, cfg.batch_size, self.shuffle_generator):
                loss, approx_kl, grad_norm = self._minibatch_gradient(minibatch, parameters, total_count)
                stopped = stopped | (approx_kl.reshape(()) > 1.5 * cfg.target_kl)
                grad_norms.append(grad_norm)
                before = [t.detach().clone() for t in self._step_state(parameters)]
                self.optimizer.step()
                with torch.no_grad():
                    # (the prefix: a first step creates the optimizer state, and is never undone)
                    for tensor, saved in zip(self._step_state(parameters)[: len(before)], before, strict=True):
                        tensor.copy_(torch.where(stopped, saved, tensor))
                kept.append(~stopped)
                losses.append(loss)
            epochs_done = epochs_done + (~stopped).to(epochs_done.dtype)
        weights = torch.stack(kept).to(batch.advantages.dtype)
        count = weights.sum()

        def mean_of(values: list[Tensor]) -> Tensor:
            return (torch.stack([v.detach().reshape(()) for v in values]) * weights).sum() / count.clamp_min(1.0)

        metrics: dict[str, Tensor | float] = {
            name: mean_of([getattr(loss, field) for loss in losses])
            for name, field in (("train/loss", "total"), ("train/policy_loss", "policy"), ("train/value_loss", "value"),
                                ("train/approx_kl", "approx_kl"), ("train/clip_fraction", "clip_fraction"))
        }
        metrics["train/grad_norm"] = mean_of(grad_norms)
        metrics.update(self._policy_change_metrics(kl_obs, old_params, batch))
        metrics["train/n_updates"] = count
        metrics["train/epochs"] = epochs_done
        metrics["train/early_stop"] = stopped.to(batch.advantages.dtype)
        return metrics

    def _minibatch_gradient(
        self, minibatch: RolloutBatch, parameters: Sequence[Tensor], total_count: int
    ) -> tuple[PPOLoss, Tensor, Tensor]:
        """The minibatch's loss, its gradient in ``.grad`` (averaged over ranks) clipped to
        ``max_grad_norm``, the gradient's norm before the clip, and the approximate KL, which
        rides in the gradients' bucket (itself in one process)."""
        result = self._minibatch_loss(minibatch, self.policy.preprocess(minibatch.observations), by_hand=True,
                                      clip=True)
        if isinstance(result, PPOGradient):
            loss = result.loss
            if len(result.grads) < len(parameters):  # (a gradient for every parameter replaces every .grad)
                self.optimizer.zero_grad(set_to_none=True)
            for param, grad in result.grads:
                param.grad = grad
        else:
            self.optimizer.zero_grad(set_to_none=True)
            loss = result
            torch.autograd.backward(loss.total)
        approx_kl = self.reducer.grads(parameters, minibatch.size, total_count, with_means=loss.approx_kl)
        assert approx_kl is not None
        grad_norm = result.grad_norm if isinstance(result, PPOGradient) else None
        if grad_norm is None:
            grad_norm = clip_grad_norm_(parameters, self.config.max_grad_norm)
        return loss, approx_kl, grad_norm

    def _policy_change_metrics(self, obs: Observations, old_params: Tensor, batch: RolloutBatch) -> dict[str, Tensor]:
        """What the update did to the policy: exact mean KL(old ‖ new) and entropy over ``obs``
        (the rollout, or ``kl_batch_size`` samples of it), the critic's explained variance
        before the update, and the Gaussian's mean std (device tensors)."""
        policy = self.policy
        with torch.no_grad():
            new_params = policy.dist_params(obs)
            metrics = {
                "train/kl": policy.distribution.kl(old_params, new_params).mean(),
                "train/entropy": policy.distribution.entropy(new_params).mean(),
                "train/explained_variance": explained_variance(batch.values, batch.returns),
            }
            if policy.log_std is not None:
                metrics["train/std"] = policy.log_std.exp().mean()
        return metrics

    def _step_state(self, parameters: Sequence[Tensor]) -> list[Tensor]:
        """The tensors an optimizer step changes: the parameters and the optimizer's state tensors."""
        state = [t for p in parameters for t in self.optimizer.state.get(p, {}).values() if isinstance(t, Tensor)]
        return [p.detach() for p in parameters] + state

    def update(self, batch: RolloutBatch) -> dict[str, Tensor | float]:
        """``n_epochs`` passes of clipped-surrogate minibatch steps; returns device-tensor metrics.

        The early stop (``target_kl``) is decided on the minibatch's KL before its optimizer
        step; it is the only host synchronisation, and only when ``target_kl`` is set. With
        ``sync_free`` it is decided on the device instead (:meth:`_update_sync_free`).
        """
        if self.sync_free and self.config.target_kl is not None:
            return self._update_sync_free(batch)
        cfg, policy, reducer = self.config, self.policy, self.reducer
        parameters = list(policy.parameters())
        obs = policy.preprocess(batch.observations)
        kl_obs, _ = kl_sample(obs, batch.size, cfg.kl_batch_size, update_seed(self.local_seed, self.num_updates))
        with torch.no_grad():
            old_params = policy.dist_params(kl_obs)
        losses: list[PPOLoss] = []
        grad_norms: list[Tensor] = []
        early_stop = False
        epochs_done = 0
        for _ in range(cfg.n_epochs):
            for minibatch, total_count in reducer.shuffled_minibatches(batch, cfg.batch_size, self.shuffle_generator):
                loss, approx_kl, grad_norm = self._minibatch_gradient(minibatch, parameters, total_count)
                if cfg.target_kl is not None and float(approx_kl) > 1.5 * cfg.target_kl:
                    early_stop = True  # SB3's early stop, before this minibatch's step
                    break
                grad_norms.append(grad_norm)
                self.optimizer.step()
                losses.append(loss)
            if early_stop:
                break
            epochs_done += 1
        metrics: dict[str, Tensor | float] = {}
        if losses:
            def mean_of(name: str) -> Tensor:
                return torch.stack([getattr(loss, name).detach() for loss in losses]).mean()

            metrics = {
                "train/loss": mean_of("total"),
                "train/policy_loss": mean_of("policy"),
                "train/value_loss": mean_of("value"),
                "train/approx_kl": mean_of("approx_kl"),
                "train/clip_fraction": mean_of("clip_fraction"),
                "train/grad_norm": torch.stack(grad_norms).mean(),
            }
        metrics.update(self._policy_change_metrics(kl_obs, old_params, batch))
        metrics["train/n_updates"] = float(len(losses))
        metrics["train/epochs"] = float(epochs_done)
        metrics["train/early_stop"] = float(early_stop)
        return metrics
