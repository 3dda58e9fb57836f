"""What every agent's update reports: shared metric helpers.

An update returns a ``dict`` of device tensors (grouped keys such as ``train/kl``); the loop
reads them to the host once per update with :func:`to_host`, one transfer for all of them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from trpo_lab.rollout.buffer import Observations, _first, map_observations

__all__ = ["explained_variance", "kl_sample", "to_host", "update_seed"]


def explained_variance(predictions: Tensor, targets: Tensor) -> Tensor:
    """``1 − Var[y − ŷ] / Var[y]`` (NaN when ``Var[y] = 0``)."""
    var_y = targets.var()
    return 1.0 - (targets - predictions).var() / var_y


def to_host(metrics: Mapping[str, Tensor | float]) -> dict[str, float]:
    """Scalar metrics as Python floats, in one device-to-host transfer for all tensors."""
    keys = [key for key, value in metrics.items() if isinstance(value, Tensor)]
    out = {key: float(value) for key, value in metrics.items() if not isinstance(value, Tensor)}
    if keys:
        stacked = torch.stack([metrics[key].detach().float().reshape(()) for key in keys])  # type: ignore[union-attr]
        out.update(zip(keys, stacked.cpu().tolist()))
    return {key: out[key] for key in metrics}


def kl_sample(obs: Observations, size: int, count: int | None, seed: int) -> tuple[Observations, Tensor | None]:
    """The observations an update's policy-change metrics are measured on (``kl_batch_size``).

    ``(obs, None)`` when ``count`` is None or not below the batch ``size``; otherwise ``count``
    rows drawn without replacement by a generator seeded with ``seed`` (the agent passes one
    made of its seed and update count), with their indices. The draw touches none of the
    agent's generators, so training is the same with and without a subset, and a resumed run
    draws the same rows. The mean KL over them is an unbiased estimate of the batch's mean
    KL, for ``count / size`` of the forward passes it takes (PPO needs one before and one
    after the epochs, ACKTR one after its step).
    """
    if count is None or count >= size:
        return obs, None
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(size, generator=generator)[:count].to(_first(obs).device)
    return map_observations(lambda field: field[index], obs), index


def update_seed(seed: int, update: int) -> int:
    """A 63-bit seed for the ``update``-th update of an agent seeded with ``seed``."""
    return (seed * 0x9E3779B97F4A7C15 + update) % (1 << 63)
