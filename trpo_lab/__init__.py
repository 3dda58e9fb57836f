"""trpo_lab: trust-region and natural-gradient reinforcement learning.

The top-level names are imported lazily so that ``import trpo_lab.optim`` (the
RL-agnostic curvature toolkit) and the CLI start without loading every agent.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "TRPO": "trpo_lab.agents.trpo",
    "NPG": "trpo_lab.agents.npg",
    "ACKTR": "trpo_lab.agents.acktr",
    "PPO": "trpo_lab.agents.ppo",
    "make_vec_env": "trpo_lab.envs",
}

__all__ = ["TRPO", "NPG", "ACKTR", "PPO", "make_vec_env", "__version__"]

if TYPE_CHECKING:
    from trpo_lab.agents.trpo import TRPO
    from trpo_lab.envs import make_vec_env


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trpo_lab' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
