"""Atari 2600 games through ``ale-py`` and Gymnasium's own Atari wrappers.

:func:`make_vec_env` builds an Atari id (``"ALE/Pong-v5"``, ``"PongNoFrameskip-v4"``) with
:func:`atari_env_factory`: per sub-environment,

    gym.make(id, frameskip=1)                 the emulator, one frame per step
    → AtariPreprocessing                      no-op reset (up to ``noop_max`` no-ops),
                                              ``frame_skip`` frames per action (max-pooled
                                              over the last two), 84 × 84 grayscale uint8,
                                              optionally terminal on life loss
    → FrameStackObservation(``frame_stack``)  the last 4 frames: observations (4, 84, 84) uint8

and above the vector env's ``RecordEpisodeStatistics``, rewards clipped to [−1, 1]
(Gymnasium's vector ``ClipReward``; the sign of the reward, since ALE's rewards are
integers), so that training sees clipped rewards while the logged ``rollout/return_mean``
is the raw game score (Mnih et al., 2015). With ``terminal_on_life_loss`` an episode, and
so a logged return, is one life.

*Frames and agent steps*: one agent step is ``frame_skip`` (4) emulator frames. Budgets
(``total_timesteps``, ``n_steps``) count agent steps; ``envs/atari.toml`` states its budgets
in frames too, and the agents log ``time/frames`` beside ``time/timesteps`` for Atari ids.

``ALE/...-v5`` ids keep their sticky actions (``repeat_action_probability = 0.25``, Machado
et al., 2018); ``NoFrameskip-v4`` ids have none. Both are passed ``frameskip=1`` so that the
frame skip is AtariPreprocessing's alone.

Options (keys of ``env_kwargs`` for an Atari id; every other key goes to ``gym.make``):
``noop_max`` (30), ``frame_skip`` (4), ``screen_size`` (84), ``terminal_on_life_loss``
(False), ``frame_stack`` (4), ``clip_reward`` (True).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import gymnasium as gym

from trpo_lab.validation import check_int, require

__all__ = [
    "ATARI_OPTIONS",
    "AtariOptions",
    "atari_env_factory",
    "frames_per_step",
    "is_atari_id",
    "register_atari",
    "split_atari_kwargs",
]


@dataclass(frozen=True, kw_only=True)
class AtariOptions:
    """The preprocessing of an Atari env (see the module docstring for each field)."""

    noop_max: int = 30
    frame_skip: int = 4
    screen_size: int = 84
    terminal_on_life_loss: bool = False
    frame_stack: int = 4
    clip_reward: bool = True

    def __post_init__(self) -> None:
        check_int("noop_max", self.noop_max, minimum=0)
        check_int("frame_skip", self.frame_skip, minimum=1)
        check_int("screen_size", self.screen_size, minimum=1)
        check_int("frame_stack", self.frame_stack, minimum=1)
        for flag in ("terminal_on_life_loss", "clip_reward"):
            value = getattr(self, flag)
            require(isinstance(value, bool), flag, value, "true or false")


ATARI_OPTIONS = tuple(field.name for field in fields(AtariOptions))


def register_atari() -> bool:
    """Register ale-py's environments with Gymnasium; False when ale-py is not installed."""
    try:
        import ale_py
    except ImportError:
        return False
    gym.register_envs(ale_py)
    return True


def is_atari_id(env_id: str) -> bool:
    """Whether ``env_id`` names an Atari game: ``ALE/<Game>-v5`` or ``<Game>NoFrameskip-v4``-style ids."""
    if env_id.startswith("ALE/"):
        return True
    if "NoFrameskip" in env_id or env_id.endswith("-ram-v4") or env_id.endswith("Deterministic-v4"):
        register_atari()
        return env_id in gym.registry and "ale_py" in str(gym.registry[env_id].entry_point)
    return False


def split_atari_kwargs(env_kwargs: Mapping[str, Any]) -> tuple[AtariOptions, dict[str, Any]]:
    """``(preprocessing options, gym.make kwargs)`` from an Atari env's ``env_kwargs``.

    Raises:
        ValueError: an option with a bad value, naming it.
    """
    options = {key: value for key, value in env_kwargs.items() if key in ATARI_OPTIONS}
    make_kwargs = {key: value for key, value in env_kwargs.items() if key not in ATARI_OPTIONS}
    return AtariOptions(**options), make_kwargs


def frames_per_step(env_id: str | None, env_kwargs: Mapping[str, Any]) -> int:
    """Emulator frames per agent step: ``frame_skip`` for an Atari id, else 1."""
    if env_id is None or not is_atari_id(env_id):
        return 1
    return split_atari_kwargs(env_kwargs)[0].frame_skip


def atari_env_factory(env_id: str, env_kwargs: Mapping[str, Any]) -> tuple[Callable[[], gym.Env], AtariOptions]:
    """A factory of one preprocessed Atari env for ``env_id``, and its options.

    Raises:
        ValueError: ale-py is not installed, or an unknown id or option.
    """
    if not register_atari():
        raise ValueError(
            f"Environment {env_id!r} needs ale-py; install it with: pip install 'trpo-lab[atari]'"
        )
    options, make_kwargs = split_atari_kwargs(env_kwargs)
    make_kwargs.setdefault("frameskip", 1)

    def factory() -> gym.Env:
        env = gym.make(env_id, **make_kwargs)
        env = gym.wrappers.AtariPreprocessing(
            env,
            noop_max=options.noop_max,
            frame_skip=options.frame_skip,
            screen_size=options.screen_size,
            terminal_on_life_loss=options.terminal_on_life_loss,
            grayscale_obs=True,
        )
        return gym.wrappers.FrameStackObservation(env, options.frame_stack)

    return factory, options
