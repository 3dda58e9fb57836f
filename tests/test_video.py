"""Evaluation videos (trpo_lab/envs/video.py, ``trpo-lab eval RUN_DIR --video DIR``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trpo_lab import PPO

pytest.importorskip("moviepy")
pytest.importorskip("pygame")
imageio = pytest.importorskip("imageio")


def _frames(path: Path) -> list[np.ndarray]:
    """Every decoded frame (imageio's ffmpeg reader reports an infinite length, so no ``list(reader)``)."""
    reader = imageio.get_reader(str(path))
    try:
        return [frame for frame in reader]
    finally:
        reader.close()


def test_eval_video_writes_one_decodable_mp4_per_episode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trpo_lab.cli import main

    run_dir = tmp_path / "run"
    agent = PPO("CartPole-v1", n_envs=2, n_steps=32, n_epochs=1, normalize_obs=True, seed=0)
    agent.learn(64, run_dir=run_dir, tensorboard=False)
    returns = agent.evaluate(2, video_folder=tmp_path / "direct")
    agent.close()

    videos = sorted((tmp_path / "direct").glob("*.mp4"))
    assert [v.name for v in videos] == ["ppo-CartPole-v1-episode-0.mp4", "ppo-CartPole-v1-episode-1.mp4"]
    for video, episode_return in zip(videos, returns):
        frames = _frames(video)
        # CartPole pays 1 per step: the reset frame plus one frame per step, less the last one
        # when MoviePy's duration (frames / fps) rounds down for some clip lengths
        assert int(episode_return) <= len(frames) <= int(episode_return) + 1
        assert frames[0].shape == (400, 600, 3) and frames[0].std() > 0, "blank frames"

    assert main(["eval", str(run_dir), "--episodes", "1", "--video", str(tmp_path / "cli")]) == 0
    assert "recorded 1 episode video(s)" in capsys.readouterr().out
    (video,) = (tmp_path / "cli").glob("*.mp4")
    assert len(_frames(video)) > 1


def test_video_returns_equal_plain_evaluation(tmp_path: Path) -> None:
    agent = PPO("CartPole-v1", n_envs=1, n_steps=16, n_epochs=1, seed=1)
    try:
        plain = agent.evaluate(1, seed=7)
        recorded = agent.evaluate(1, seed=7, video_folder=tmp_path)
    finally:
        agent.close()
    np.testing.assert_array_equal(plain, recorded)
