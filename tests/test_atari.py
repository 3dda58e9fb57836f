"""Atari through ale-py and Gymnasium's wrappers (skipped when ale-py is not installed)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium.wrappers.vector import ClipReward, RecordEpisodeStatistics

pytest.importorskip("ale_py")
pytest.importorskip("cv2")

from trpo_lab import PPO, make_vec_env  # noqa: E402
from trpo_lab.envs.atari import AtariOptions, frames_per_step, is_atari_id  # noqa: E402
from trpo_lab.presets import load_preset, load_suite  # noqa: E402


def _chain(env: object) -> list[type]:
    types = []
    while env is not None:
        types.append(type(env))
        env = getattr(env, "env", None)
    return types


@pytest.mark.parametrize("env_id", ["ALE/Pong-v5", "PongNoFrameskip-v4"])
def test_atari_ids_get_the_standard_preprocessing(env_id: str) -> None:
    env = make_vec_env(env_id, n_envs=2, seed=0)
    try:
        space = env.single_observation_space
        assert space.shape == (4, 84, 84) and space.dtype == np.uint8
        chain = _chain(env)
        # rewards are clipped above the episode statistics: training sees [-1, 1], the logs the raw score
        assert chain.index(ClipReward) < chain.index(RecordEpisodeStatistics)
        sub = env.unwrapped.envs[0] if hasattr(env.unwrapped, "envs") else None
        assert sub is not None and sub.unwrapped._frameskip == 1  # noqa: SLF001 - the skip is AtariPreprocessing's
        obs, _ = env.reset(seed=0)
        obs, rewards, *_ = env.step(np.zeros(2, dtype=np.int64))
        assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8 and np.all(np.abs(rewards) <= 1)
    finally:
        env.close()


def test_atari_options_and_frames() -> None:
    assert is_atari_id("ALE/Breakout-v5") and is_atari_id("BreakoutNoFrameskip-v4") and not is_atari_id("CartPole-v1")
    assert frames_per_step("ALE/Pong-v5", {}) == 4 and frames_per_step("ALE/Pong-v5", {"frame_skip": 2}) == 2
    assert frames_per_step("CartPole-v1", {"frame_skip": 2}) == 1
    env = make_vec_env("ALE/Pong-v5", n_envs=1, env_kwargs={"frame_stack": 2, "screen_size": 64})
    assert env.single_observation_space.shape == (2, 64, 64)
    env.close()
    with pytest.raises(ValueError, match=r"Invalid frame_skip: 0; expected an integer >= 1"):
        AtariOptions(frame_skip=0)
    with pytest.raises(ValueError, match=r"Invalid frame_skip: 0"):
        make_vec_env("ALE/Pong-v5", env_kwargs={"frame_skip": 0})


def test_observation_normalization_is_never_applied_to_images() -> None:
    with pytest.warns(UserWarning, match=r"normalize_obs ignored for 'ALE/Pong-v5': its observations are uint8 images"):
        env = make_vec_env("ALE/Pong-v5", n_envs=1, normalize_obs=True)
    assert env.single_observation_space.dtype == np.uint8
    env.close()


def test_the_suite_and_presets_resolve() -> None:
    suite, _ = load_suite("atari")
    assert len(suite) == 6 and all(entry["total_timesteps"] * 4 == 10_000_000 for entry in suite.values())
    for algo in ("acktr", "ppo", "trpo"):
        hyper, run = load_preset(algo, "PongNoFrameskip-v4")
        assert run["total_timesteps"] == 2_500_000 and hyper["policy_kwargs"]["net_arch"] == []
    hyper, run = load_preset("acktr", "PongNoFrameskip-v4")
    assert hyper["policy_kwargs"]["share_features_extractor"] is True and run["n_envs"] == 16
    assert hyper["learning_rate"] == "linear:0.25:0" and hyper["kl_clip"] == 0.001


def test_ppo_smoke_run_on_pong_logs_frames_and_agent_steps(tmp_path: Path) -> None:
    """A few thousand frames of Pong through make_vec_env: the whole pipeline runs (PPO: no
    eigendecomposition of the CNN's 3137-wide K-FAC factor, which dominates a CPU run this short)."""
    agent = PPO(
        "PongNoFrameskip-v4", n_envs=2, seed=0, n_steps=64, n_epochs=1, batch_size=64,
        policy_kwargs={"share_features_extractor": True, "net_arch": []},
    )
    agent.learn(512, run_dir=tmp_path, tensorboard=False)  # 2,048 frames
    assert agent.buffer.observations.dtype == torch.uint8
    with open(tmp_path / "progress.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(float(r["time/frames"]) == 4 * float(r["timesteps"]) for r in rows)
    assert all(bool(torch.isfinite(p.detach()).all()) for p in agent.policy.parameters())
    agent.close()
