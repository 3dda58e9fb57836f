"""What every agent's update reports: shared metric helpers.

An update returns a ``dict`` of device tensors (grouped keys such as ``train/kl``); the loop
reads them to the host once per update with :func:`to_host`, one transfer for all of them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["explained_variance", "to_host"]


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
