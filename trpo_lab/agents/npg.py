"""Natural policy gradient (Kakade, 2001; Rajeswaran et al., 2017) on the TRPO machinery.

The update is TRPO's without the line search: the natural direction s ≈ F⁻¹ g from the
curvature backend is scaled to the KL radius δ = ``target_kl`` and applied in full,

    θ_new = θ_old + sqrt(2 δ / sᵀ F s) · s,

which is a natural-gradient step with a step size chosen per update from the quadratic KL
model (:func:`trpo_lab.optim.trust_region.natural_step`). Everything else (surrogate,
Fisher-vector products, curvature backends, critic fit, metrics) is
:class:`~trpo_lab.agents.trpo.TrustRegionAgent`'s. Since nothing backtracks, the KL actually
reached (logged as ``train/kl``) can differ from δ where the quadratic model is poor.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from trpo_lab.agents.trpo import NaturalStep, TrustRegionAgent
from trpo_lab.config import NPGConfig
from trpo_lab.optim.trust_region import take_full_step
from trpo_lab.rollout.buffer import RolloutBatch

__all__ = ["NPG"]


class NPG(TrustRegionAgent):
    """Natural policy gradient with a KL-scaled step: TRPO minus the line search.

    Example:
        >>> agent = NPG("CartPole-v1", n_envs=8, seed=0, n_steps=256, target_kl=0.02)  # doctest: +SKIP
        >>> agent.learn(150_000, run_dir="runs/cartpole-npg")                          # doctest: +SKIP
    """

    algo: ClassVar[str] = "npg"
    config_class: ClassVar[type[NPGConfig]] = NPGConfig
    config: NPGConfig

    def apply_step(self, step: NaturalStep, obs: Tensor, batch: RolloutBatch, advantages: Tensor) -> dict[str, Tensor]:
        loss, kl = take_full_step(self.policy.actor_parameters(), step)
        return {
            "train/kl": kl,
            "train/expected_improvement": step.expected_improvement.detach(),
            "train/actual_improvement": step.loss0 - loss,
        }
