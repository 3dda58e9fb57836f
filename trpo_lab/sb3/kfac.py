"""K-FAC preconditioning for Stable-Baselines3's actor-critic policies (A2C, PPO, ACKTR).

A K-FAC policy is an SB3 ``ActorCriticPolicy`` whose ``optimizer`` is
:class:`trpo_lab.optim.KFAC` over the whole policy network (actor and critic, Linear and
Conv2d layers; free parameters such as a Gaussian ``log_std`` take plain gradient steps), and
whose ``evaluate_actions`` records K-FAC statistics from a *sampled* Fisher pass each time
the algorithm evaluates a training batch (Wu et al. 2017, ACKTR):

    L_F = −mean(log π(ã|s)) + vf_fisher_coef · mean((V(s) − y)²),
    ã ~ π(·|s) (current policy),   y = stop_gradient(V(s)) + N(0, 1)

— the log-likelihood of actions drawn from the policy itself (the true Fisher, not the
empirical one) plus the Gauss-Newton matrix of the value head read as a unit-variance
Gaussian. SB3's A2C and PPO call ``evaluate_actions`` once per minibatch right before
``optimizer.zero_grad(); loss.backward(); optimizer.step()``, so their update becomes a
KL-clipped K-FAC step with no change to SB3's code::

    model = A2C(KFACActorCriticPolicy, env, learning_rate=0.25, ent_coef=0.01,
                policy_kwargs=dict(kfac_kwargs=dict(kl_clip=1e-3, damping=1e-2)))

The algorithm's ``learning_rate`` (and its schedule) is K-FAC's ``lr``; ``kfac_kwargs`` hold
the other :class:`~trpo_lab.optim.KFAC` arguments (``momentum``, ``damping``, ``kl_clip``,
``stat_decay``, ``inverse_every``, ``weight_decay``, ``damping_mode``). Optimizer state
(factors, eigenbases, momentum) is saved and loaded with the model's zip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import (
    ActorCriticCnnPolicy,
    ActorCriticPolicy,
    MultiInputActorCriticPolicy,
)
from torch import Tensor

from trpo_lab.optim.fisher import sampled_fisher_loss
from trpo_lab.optim.kfac import KFAC

if TYPE_CHECKING:
    from stable_baselines3.common.type_aliases import PyTorchObs, Schedule

__all__ = [
    "KFACActorCriticCnnPolicy",
    "KFACActorCriticPolicy",
    "KFACMultiInputActorCriticPolicy",
    "KFACPolicyMixin",
]

_KFAC_ARGUMENTS = ("momentum", "damping", "kl_clip", "stat_decay", "inverse_every", "weight_decay", "damping_mode")


class KFACPolicyMixin:
    """Makes an SB3 ``ActorCriticPolicy`` train with :class:`~trpo_lab.optim.KFAC` (see the module docstring).

    Args:
        kfac_kwargs: :class:`~trpo_lab.optim.KFAC` arguments other than the module and
            ``lr`` (which is the algorithm's ``learning_rate``).
        vf_fisher_coef: Weight of the critic's term in the Fisher loss. Default 1.0.
        *args, **kwargs: The SB3 policy's own arguments (``net_arch``, ``activation_fn``,
            ``ortho_init``, ...). ``optimizer_class``/``optimizer_kwargs`` are ignored: the
            optimizer is K-FAC (A2C passes RMSprop unless ``use_rms_prop=False``).
    """

    optimizer: Any  # a KFAC (ACKTR's policies: an ActorCriticKFAC); SB3 declares a torch Optimizer

    def __init__(
        self,
        *args: Any,
        kfac_kwargs: dict[str, Any] | None = None,
        vf_fisher_coef: float = 1.0,
        **kwargs: Any,
    ) -> None:
        kfac_kwargs = dict(kfac_kwargs or {})
        unknown = sorted(set(kfac_kwargs) - set(_KFAC_ARGUMENTS))
        if unknown:
            hint = " (the learning rate is the algorithm's learning_rate)" if "lr" in unknown else ""
            raise ValueError(
                f"Invalid kfac_kwargs key(s) {unknown}{hint}; expected some of {list(_KFAC_ARGUMENTS)}"
            )
        # The optimizer is K-FAC: drop SB3's optimizer choice (A2C injects RMSprop by default).
        kwargs.pop("optimizer_class", None)
        kwargs.pop("optimizer_kwargs", None)
        if not vf_fisher_coef >= 0:
            raise ValueError(f"Invalid vf_fisher_coef: {vf_fisher_coef!r}; expected a number >= 0")
        self.kfac_kwargs = kfac_kwargs
        self.vf_fisher_coef = float(vf_fisher_coef)
        self._last_distribution: Distribution | None = None
        super().__init__(*args, **kwargs)

    def _build(self, lr_schedule: Schedule) -> None:
        super()._build(lr_schedule)  # type: ignore[misc]
        self.optimizer = self.make_optimizer(lr_schedule(1))

    def make_optimizer(self, lr: float) -> Any:
        """The policy's optimizer: one :class:`~trpo_lab.optim.KFAC` over the whole policy.

        :class:`trpo_lab.sb3.ACKTR`'s policies override this with ACKTR's two K-FACs."""
        return KFAC(self, lr=lr, **self.kfac_kwargs)  # type: ignore[arg-type]

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data: dict[str, Any] = super()._get_constructor_parameters()  # type: ignore[misc]
        data.update(kfac_kwargs=self.kfac_kwargs, vf_fisher_coef=self.vf_fisher_coef)
        return data

    def _get_action_dist_from_latent(self, latent_pi: Tensor) -> Distribution:
        distribution: Distribution = super()._get_action_dist_from_latent(latent_pi)  # type: ignore[misc]
        self._last_distribution = distribution
        return distribution

    def evaluate_actions(self, obs: PyTorchObs, actions: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """SB3's ``evaluate_actions``, plus a Fisher pass that updates K-FAC's statistics.

        The pass runs only in training mode with gradients enabled (inside an algorithm's
        ``train()``); it backpropagates :func:`trpo_lab.optim.fisher.sampled_fisher_loss`
        (actions drawn by the SB3 distribution, value noise from torch's default generator)
        through the same forward graph with ``torch.autograd.grad``, so no ``.grad`` is touched.
        """
        if not (self.training and torch.is_grad_enabled()):  # type: ignore[attr-defined]
            return super().evaluate_actions(obs, actions)  # type: ignore[misc,no-any-return]
        trainable = [param for param in self.parameters() if param.requires_grad]  # type: ignore[attr-defined]
        try:
            with self.optimizer.track_statistics():
                values, log_prob, entropy = super().evaluate_actions(obs, actions)  # type: ignore[misc]
                distribution = self._last_distribution
                assert distribution is not None  # set by the forward pass just above
                sampled = distribution.get_actions(deterministic=False)
                fisher = sampled_fisher_loss(distribution.log_prob, sampled, values)
                torch.autograd.grad(fisher.total(self.vf_fisher_coef), trainable, retain_graph=True, allow_unused=True)
        finally:
            self._last_distribution = None
        return values, log_prob, entropy


class KFACActorCriticPolicy(KFACPolicyMixin, ActorCriticPolicy):
    """SB3's ``MlpPolicy`` (``ActorCriticPolicy``) trained with K-FAC."""


class KFACActorCriticCnnPolicy(KFACPolicyMixin, ActorCriticCnnPolicy):
    """SB3's ``CnnPolicy`` (``ActorCriticCnnPolicy``, NatureCNN) trained with K-FAC (KFC for Conv2d)."""


class KFACMultiInputActorCriticPolicy(KFACPolicyMixin, MultiInputActorCriticPolicy):
    """SB3's ``MultiInputPolicy`` (Dict observations) trained with K-FAC."""
