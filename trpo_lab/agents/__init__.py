"""The on-policy agents: TRPO, NPG, ACKTR and PPO on one shared loop (``base.py``)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trpo_lab.agents.base import OnPolicyAgent

__all__ = ["AGENT_MODULES", "agent_class"]

AGENT_MODULES: dict[str, tuple[str, str]] = {
    "trpo": ("trpo_lab.agents.trpo", "TRPO"),
    "npg": ("trpo_lab.agents.npg", "NPG"),
    "acktr": ("trpo_lab.agents.acktr", "ACKTR"),
    "ppo": ("trpo_lab.agents.ppo", "PPO"),
}


def agent_class(algo: str) -> type[OnPolicyAgent]:
    """The agent class for an algorithm name (case-insensitive).

    Raises:
        ValueError: unknown algorithm, naming the ones available.
    """
    key = algo.lower()
    if key not in AGENT_MODULES:
        raise ValueError(f"Unknown algorithm {algo!r}; expected one of {', '.join(sorted(AGENT_MODULES))}")
    module_name, class_name = AGENT_MODULES[key]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise ValueError(f"Algorithm {algo!r} is not available in this version of trpo_lab") from exc
    cls: type[OnPolicyAgent] = getattr(module, class_name)
    return cls
