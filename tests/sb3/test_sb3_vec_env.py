"""The SB3 VecEnv <-> gymnasium.vector bridge: exact episodes, SB3's VecEnv contract, trpo_lab agents on SB3 envs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode
from gymnasium.wrappers.vector import RecordEpisodeStatistics
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import (
    DummyVecEnv,
    VecCheckNan,
    VecEnv,
    VecFrameStack,
    VecMonitor,
    VecNormalize,
)

import trpo_lab
from trpo_lab.agents.base import space_signature
from trpo_lab.sb3 import GymnasiumToSB3VecEnv, SB3ToGymnasiumVectorEnv, make_sb3_vec_env

STEPS = 400


def _short_cartpole() -> gym.Env:
    # A 15-step time limit: both terminations and truncations happen within STEPS.
    return gym.make("CartPole-v1", max_episode_steps=15)


def _pendulum() -> gym.Env:
    return gym.make("Pendulum-v1", max_episode_steps=20)


def _actions(space: gym.Space, n_envs: int, steps: int, seed: int = 0) -> list[np.ndarray]:
    space = gym.vector.utils.batch_space(space, n_envs)
    space.seed(seed)
    return [space.sample() for _ in range(steps)]


# ----------------------------------------------------------------------------- gymnasium -> SB3


@pytest.mark.parametrize("factory", [_short_cartpole, _pendulum], ids=["CartPole", "Pendulum"])
def test_gymnasium_to_sb3_matches_dummy_vec_env_exactly(factory: Any) -> None:
    """Same seeds and actions: identical obs, rewards, dones, terminal observations, truncation flags."""
    n_envs = 3
    direct = DummyVecEnv([factory] * n_envs)
    bridged = GymnasiumToSB3VecEnv(
        RecordEpisodeStatistics(gym.vector.SyncVectorEnv([factory] * n_envs, autoreset_mode=AutoresetMode.SAME_STEP))
    )
    direct.seed(7)
    bridged.seed(7)
    np.testing.assert_array_equal(bridged.reset(), direct.reset())
    episodes = truncations = 0
    for actions in _actions(direct.action_space, n_envs, STEPS):
        obs, rewards, dones, infos = bridged.step(actions)
        obs_d, rewards_d, dones_d, infos_d = direct.step(actions)
        np.testing.assert_array_equal(obs, obs_d)
        np.testing.assert_array_equal(rewards, rewards_d)
        assert rewards.dtype == rewards_d.dtype == np.float32
        np.testing.assert_array_equal(dones, dones_d)
        for info, info_d in zip(infos, infos_d):
            assert info["TimeLimit.truncated"] == info_d["TimeLimit.truncated"]
            if "terminal_observation" in info_d:
                np.testing.assert_array_equal(info["terminal_observation"], info_d["terminal_observation"])
                assert "episode" in info
                episodes += 1
                truncations += info["TimeLimit.truncated"]
    assert episodes > 10 and truncations > 0


def test_gymnasium_to_sb3_passes_sb3_vec_env_checks() -> None:
    venv = make_sb3_vec_env("CartPole-v1", n_envs=2, seed=0)
    assert isinstance(venv, VecEnv)
    assert venv.observation_space == gym.make("CartPole-v1").observation_space
    assert venv.get_attr("spec")[0].id == "CartPole-v1"
    assert venv.get_attr("render_mode") == [None, None]
    venv.set_attr("custom", 3, indices=[1])
    assert venv.get_attr("custom", indices=1) == [3]
    assert venv.env_method("get_wrapper_attr", "custom", indices=[1]) == [3]
    assert venv.env_is_wrapped(gym.wrappers.TimeLimit) == [True, True]
    assert venv.env_is_wrapped(Monitor) == [False, False]
    assert venv.seed(3) == [3, 4]
    # SB3's wrappers stack on it, and VecCheckNan validates every step.
    stacked = VecCheckNan(VecFrameStack(VecNormalize(VecMonitor(venv)), n_stack=2), raise_exception=True)
    obs = stacked.reset()
    assert obs.shape == (2, 8) and obs.dtype == np.float32
    for actions in _actions(venv.action_space, 2, 60):
        obs, rewards, dones, infos = stacked.step(actions)
        assert obs.shape == (2, 8) and rewards.shape == (2,) and dones.dtype == bool and len(infos) == 2
    stacked.close()


def test_gymnasium_to_sb3_refuses_next_step_envs() -> None:
    with pytest.raises(ValueError, match="SAME_STEP"):
        GymnasiumToSB3VecEnv(trpo_lab.make_vec_env("CartPole-v1", n_envs=2))


def test_sb3_ppo_trains_on_a_gymnasium_vector_env() -> None:
    env = make_sb3_vec_env("CartPole-v1", n_envs=4, seed=0)
    model = PPO("MlpPolicy", env, n_steps=64, batch_size=128, n_epochs=1, seed=0, device="cpu")
    model.learn(512)
    assert len(model.ep_info_buffer) > 5  # episode statistics reach SB3's rollout/ep_rew_mean
    assert all(info["r"] == info["l"] for info in model.ep_info_buffer)  # CartPole: reward 1 per step


# ----------------------------------------------------------------------------- SB3 -> gymnasium


def _next_step_direct(factory: Any, n_envs: int) -> gym.vector.VectorEnv:
    return RecordEpisodeStatistics(gym.vector.SyncVectorEnv([factory] * n_envs, autoreset_mode=AutoresetMode.NEXT_STEP))


def test_sb3_to_gymnasium_is_exact_until_the_first_reset_step() -> None:
    """Several sub-environments: identical to a NEXT_STEP SyncVectorEnv up to and including each
    one's first episode end (final observation, reward, terminated/truncated, episode statistics)."""
    n_envs = 4
    direct = _next_step_direct(_short_cartpole, n_envs)
    bridged = SB3ToGymnasiumVectorEnv(make_vec_env(_short_cartpole, n_envs=n_envs))
    assert bridged.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    assert bridged.single_observation_space == direct.single_observation_space
    obs, _ = bridged.reset(seed=11)
    obs_d, _ = direct.reset(seed=11)
    np.testing.assert_array_equal(obs, obs_d)
    ended = np.zeros(n_envs, dtype=bool)
    for actions in _actions(bridged.single_action_space, n_envs, 20):
        step, step_d = bridged.step(actions), direct.step(actions)
        assert bridged.observation_space.contains(step[0])
        live = ~ended
        for got, want in zip(step[:4], step_d[:4]):
            np.testing.assert_array_equal(got[live], want[live])
        done = (step_d[2] | step_d[3]) & live
        if done.any():
            np.testing.assert_array_equal(step[4]["_episode"] & done, done)
            np.testing.assert_array_equal(step[4]["episode"]["r"][done], step_d[4]["episode"]["r"][done])
            np.testing.assert_array_equal(step[4]["episode"]["l"][done], step_d[4]["episode"]["l"][done])
        ended |= done
    assert ended.all()


@pytest.mark.parametrize("factory", [_short_cartpole, _pendulum], ids=["CartPole", "Pendulum"])
def test_sb3_to_gymnasium_round_trips_whole_episodes(factory: Any) -> None:
    """One sub-environment, many episodes. Gymnasium's reset step ignores its action; the bridge
    applies it (an SB3 VecEnv cannot pause a sub-environment). So feed the bridge the direct run's
    actions without the reset steps' ones: then the bridge's stream is the direct stream with each
    reset step removed and the first reward of each later episode reported as 0 (the rollout loop
    ignores the reset step's reward anyway) -- every episode's observations, final observation,
    terminated/truncated and episode statistics are identical (rewards at SB3's float32)."""
    direct = _next_step_direct(factory, 1)
    bridged = SB3ToGymnasiumVectorEnv(make_vec_env(factory, n_envs=1))
    obs_d, _ = direct.reset(seed=3)
    obs, _ = bridged.reset(seed=3)
    np.testing.assert_array_equal(obs, obs_d)
    direct_stream = []
    autoreset = False
    for actions in _actions(direct.single_action_space, 1, STEPS):
        step = direct.step(actions)
        if autoreset:
            autoreset = False  # the reset step: gymnasium ignored this action
            continue
        direct_stream.append((actions, step))
        autoreset = bool(step[2][0] or step[3][0])
    first_of_episode = True
    episodes = 0
    for actions, step_d in direct_stream:
        step = bridged.step(actions)
        np.testing.assert_array_equal(step[0], step_d[0])
        # Rewards pass through SB3's float32 reward buffer.
        assert step[1][0] == (0.0 if first_of_episode and episodes else np.float32(step_d[1][0]))
        assert (step[2][0], step[3][0]) == (step_d[2][0], step_d[3][0])
        first_of_episode = bool(step_d[2][0] or step_d[3][0])
        if first_of_episode:
            episodes += 1
            assert step[4]["episode"]["r"][0] == pytest.approx(step_d[4]["episode"]["r"][0], rel=1e-5)
            assert step[4]["episode"]["l"][0] == step_d[4]["episode"]["l"][0]
    assert episodes >= 10


def test_sb3_to_gymnasium_takes_vec_normalize_and_monitor_statistics() -> None:
    venv = VecNormalize(make_vec_env("CartPole-v1", n_envs=2, seed=0), norm_obs=True, norm_reward=True)
    bridged = SB3ToGymnasiumVectorEnv(venv)
    obs, _ = bridged.reset(seed=0)
    assert obs.dtype == np.float32
    returns = []
    for actions in _actions(bridged.single_action_space, 2, 200):
        obs, rewards, terminated, truncated, infos = bridged.step(actions)
        assert obs.dtype == np.float32 and np.isfinite(obs).all()
        if "_episode" in infos:
            returns += list(infos["episode"]["r"][infos["_episode"]])
    # Monitor's unnormalized returns (CartPole: 1 per step), not VecNormalize's scaled rewards.
    assert returns and all(r == int(r) and r >= 8 for r in returns)


def test_trpo_lab_agent_on_an_sb3_vec_env_saves_and_loads(tmp_path: Path) -> None:
    venv = VecNormalize(make_vec_env("CartPole-v1", n_envs=4, seed=0), norm_reward=False)
    env = SB3ToGymnasiumVectorEnv(venv)
    agent = trpo_lab.TRPO(env, seed=0, n_steps=32, batch_size=128, n_critic_updates=1)
    assert agent.n_envs == 4
    assert space_signature(agent.observation_space) == {"type": "Box", "shape": [4]}
    assert space_signature(agent.action_space) == {"type": "Discrete", "n": 2}
    agent.learn(512, tensorboard=False)
    assert agent.num_timesteps >= 512 and agent.num_episodes > 0
    with pytest.raises(ValueError, match="env id"):
        agent.evaluate()
    agent.save(tmp_path / "agent.pt")
    with pytest.raises(ValueError, match="pass env="):
        trpo_lab.TRPO.load(tmp_path / "agent.pt")
    loaded = trpo_lab.TRPO.load(tmp_path / "agent.pt", env=env)
    observations = venv.normalize_obs(np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32))
    np.testing.assert_array_equal(loaded.predict(observations), agent.predict(observations))


@pytest.mark.slow
def test_trpo_lab_trpo_learns_cartpole_through_vec_normalize() -> None:
    """trpo_lab's own TRPO (its CartPole preset) trains on SB3's VecNormalize(make_vec_env(...))."""
    torch.manual_seed(0)
    venv = VecNormalize(make_vec_env("CartPole-v1", n_envs=8, seed=0), norm_reward=False)
    agent = trpo_lab.TRPO(SB3ToGymnasiumVectorEnv(venv), seed=0, n_steps=256, batch_size=256, cg_max_steps=10, n_critic_updates=5)
    agent.learn(40_960, tensorboard=False)
    # Mean Monitor return of the last 100 training episodes (stochastic policy); random play gets ~22.
    assert np.mean(agent.episode_returns) >= 200
