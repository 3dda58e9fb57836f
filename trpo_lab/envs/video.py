"""Evaluation videos: Gymnasium's ``RecordVideo`` on an ``rgb_array``-rendering copy of the env.

``trpo-lab eval RUN_DIR --video DIR`` and ``agent.evaluate(..., video_folder=DIR)`` record
every evaluation episode as ``DIR/<name_prefix>-episode-<i>.mp4``. Gymnasium writes the
files with MoviePy, and the classic-control envs draw their frames with pygame
(``pip install 'trpo-lab[video]'`` installs both).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
from gymnasium.wrappers import RecordVideo

from trpo_lab.envs.make import EnvSpec, check_env_id

__all__ = ["recording_env_factory", "check_video_support"]


def check_video_support() -> None:
    """Raise ``ValueError`` with the install command when MoviePy (Gymnasium's video writer) is missing."""
    try:
        import moviepy  # noqa: F401
    except ImportError:
        raise ValueError(
            "Recording videos needs MoviePy (Gymnasium's video writer); install it with: pip install 'trpo-lab[video]'"
        ) from None


def recording_env_factory(
    env: EnvSpec, video_folder: str | Path, env_kwargs: dict[str, Any] | None = None, name_prefix: str = "eval"
) -> Callable[[], gym.Env[Any, Any]]:
    """A factory of ``env`` rendering ``rgb_array`` frames, wrapped in ``RecordVideo`` (every episode).

    Args:
        env: A Gymnasium id (made with ``render_mode="rgb_array"``) or a factory whose env
            already renders ``rgb_array`` frames.
        video_folder: Where the ``.mp4`` files go (created).
        env_kwargs: Keyword arguments for ``gym.make`` (ids only).
        name_prefix: File name prefix: ``<name_prefix>-episode-<i>.mp4``.

    Raises:
        ValueError: MoviePy missing, a folder that cannot be created, or an env that cannot
            render ``rgb_array`` frames.
    """
    check_video_support()
    folder = Path(video_folder)
    had_videos = folder.is_dir() and any(folder.glob("*.mp4"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"Invalid video folder: {str(folder)!r}; cannot create it ({exc.strerror or exc})") from None
    if isinstance(env, str):
        check_env_id(env)
    kwargs = dict(env_kwargs or {})

    def factory() -> gym.Env[Any, Any]:
        made = gym.make(env, render_mode="rgb_array", **kwargs) if isinstance(env, str) else env()
        if made.render_mode != "rgb_array":
            made.close()
            raise ValueError(
                f"Cannot record {env!r}: its render_mode is {made.render_mode!r}; recording needs 'rgb_array'"
            )
        with warnings.catch_warnings():
            if not had_videos:  # RecordVideo warns about any existing folder, even the one created above
                warnings.filterwarnings("ignore", message=".*Overwriting existing videos")
            return RecordVideo(made, str(folder), episode_trigger=lambda episode: True, name_prefix=name_prefix,
                               disable_logger=True)

    return factory

