from __future__ import annotations

import numpy as np
import pytest
from gymnasium.vector import AutoresetMode
from gymnasium.wrappers.vector import NormalizeObservation, NormalizeReward

from trpo_lab.envs import (
    find_wrapper,
    load_normalization_state,
    make_vec_env,
    normalization_state,
)


def test_unknown_env_id_names_it_and_suggests_close_ids() -> None:
    with pytest.raises(ValueError, match=r"Unknown environment id 'CartPol-v1'.*CartPole-v1"):
        make_vec_env("CartPol-v1", 2)


@pytest.mark.parametrize("n_envs", [0, -1, 1.5, True])
def test_invalid_n_envs(n_envs: object) -> None:
    with pytest.raises(ValueError, match="Invalid n_envs"):
        make_vec_env("CartPole-v1", n_envs)  # type: ignore[arg-type]


def test_invalid_vectorization() -> None:
    with pytest.raises(ValueError, match="Invalid vectorization: 'threads'"):
        make_vec_env("CartPole-v1", 2, vectorization="threads")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no batched"):
        make_vec_env("Pendulum-v1", 2, vectorization="vector_entry_point")


def test_autoreset_mode_pinned_and_final_obs_returned_at_done() -> None:
    env = make_vec_env("CartPole-v1", 3, seed=1)
    assert env.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    obs, _ = env.reset(seed=1)
    done = np.zeros(3, bool)
    for _ in range(500):
        obs, _, term, trunc, info = env.step(np.zeros(3, dtype=np.int64))
        if (term | trunc).any():
            done = term | trunc
            break
    assert done.any()
    # final observation of a terminated CartPole is out of bounds (|x| > 2.4 or |theta| > 0.21)
    i = int(np.flatnonzero(done)[0])
    assert abs(obs[i, 0]) > 2.4 or abs(obs[i, 2]) > 0.2094
    assert "episode" in info and info["_episode"][i]
    reset_obs, reward, *_ = env.step(np.zeros(3, dtype=np.int64))
    assert reward[i] == 0.0 and np.all(np.abs(reset_obs[i]) <= 0.05)
    env.close()


def test_seeding_is_reproducible() -> None:
    def trajectory(seed: int) -> np.ndarray:
        env = make_vec_env("Pendulum-v1", 2, seed=seed)
        obs, _ = env.reset(seed=seed)
        out = [obs]
        for _ in range(5):
            obs, *_ = env.step(env.action_space.sample())
            out.append(obs)
        env.close()
        return np.stack(out)

    np.testing.assert_array_equal(trajectory(3), trajectory(3))
    assert not np.array_equal(trajectory(3), trajectory(4))


def test_normalization_wrappers_and_state_round_trip() -> None:
    env = make_vec_env("Pendulum-v1", 2, seed=0, normalize_obs=True, normalize_reward=True)
    assert find_wrapper(env, NormalizeObservation) is not None
    assert find_wrapper(env, NormalizeReward) is not None
    env.reset(seed=0)
    for _ in range(20):
        env.step(env.action_space.sample())
    state = normalization_state(env)
    other = make_vec_env("Pendulum-v1", 2, seed=0, normalize_obs=True, normalize_reward=True)
    load_normalization_state(other, state)
    restored = normalization_state(other)
    np.testing.assert_array_equal(restored["obs_rms"]["mean"], state["obs_rms"]["mean"])
    np.testing.assert_array_equal(restored["return_rms"]["var"], state["return_rms"]["var"])
    assert restored["obs_rms"]["count"] == state["obs_rms"]["count"]


def test_vector_entry_point_cartpole() -> None:
    env = make_vec_env("CartPole-v1", 4, seed=0, vectorization="vector_entry_point")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4, 4)
    env.close()
