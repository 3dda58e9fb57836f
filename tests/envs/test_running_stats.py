"""The faster running statistics are Gymnasium's, bit for bit, and make_vec_env uses them."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium.wrappers.utils import RunningMeanStd as GymnasiumRunningMeanStd
from gymnasium.wrappers.vector import NormalizeObservation, NormalizeReward

from trpo_lab.envs import make_vec_env
from trpo_lab.envs.guard import find_wrapper
from trpo_lab.envs.running_stats import RunningMeanStd, install_fast_statistics


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(), (17,), (3, 4)])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
def test_updates_are_bit_identical_to_gymnasium(dtype, shape, rows):
    rng = np.random.default_rng(rows)
    ours = RunningMeanStd(shape=shape, dtype=dtype)
    theirs = GymnasiumRunningMeanStd(shape=shape, dtype=dtype)
    for step in range(300):
        # Offsets and scales that change over time, so the updates are not exact in binary.
        batch = (rng.standard_normal((rows, *shape)) * (1 + step % 7) + step / 3).astype(dtype)
        ours.update(batch)
        theirs.update(batch)
    assert ours.mean.dtype == theirs.mean.dtype and ours.var.dtype == theirs.var.dtype
    np.testing.assert_array_equal(ours.mean, theirs.mean)
    np.testing.assert_array_equal(ours.var, theirs.var)
    assert ours.count == theirs.count
    assert not np.array_equal(ours.var, np.ones(shape))  # it did learn something


@pytest.mark.parametrize("batch", [np.arange(6, dtype=np.int64).reshape(3, 2), np.ones((2, 2), np.float16), np.zeros((0, 2))])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the empty batch: NaN moments in both
def test_promoted_or_empty_inputs_take_gymnasiums_path(batch):
    ours, theirs = RunningMeanStd(shape=(2,)), GymnasiumRunningMeanStd(shape=(2,))
    ours.update(batch)
    theirs.update(batch)
    np.testing.assert_array_equal(ours.mean, theirs.mean)
    np.testing.assert_array_equal(ours.var, theirs.var)


def test_install_keeps_the_state_and_is_idempotent():
    env = make_vec_env("Pendulum-v1", n_envs=2, seed=0, normalize_obs=True, normalize_reward=False)
    wrapper = find_wrapper(env, NormalizeObservation)
    wrapper.obs_rms = GymnasiumRunningMeanStd(shape=(3,), dtype=np.float32)
    wrapper.obs_rms.update(np.ones((4, 3), np.float32))
    before = (wrapper.obs_rms.mean.copy(), wrapper.obs_rms.var.copy(), wrapper.obs_rms.count)
    install_fast_statistics(wrapper)
    fast = wrapper.obs_rms
    assert isinstance(fast, RunningMeanStd)
    np.testing.assert_array_equal(fast.mean, before[0])
    np.testing.assert_array_equal(fast.var, before[1])
    assert fast.count == before[2]
    install_fast_statistics(wrapper)
    assert wrapper.obs_rms is fast
    env.close()


def _as_gymnasiums(rms: RunningMeanStd) -> GymnasiumRunningMeanStd:
    plain = GymnasiumRunningMeanStd(shape=rms.mean.shape, dtype=rms.mean.dtype)
    plain.mean, plain.var, plain.count = rms.mean.copy(), rms.var.copy(), rms.count
    return plain


def test_make_vec_env_normalizes_as_gymnasium_does():
    """The same seeded run through our env and through one with Gymnasium's statistics put back."""
    envs = [
        make_vec_env("Pendulum-v1", n_envs=2, seed=3, normalize_obs=True, normalize_reward=True, nan_policy=None)
        for _ in range(2)
    ]
    ours, theirs = envs
    obs_norm, rew_norm = find_wrapper(theirs, NormalizeObservation), find_wrapper(theirs, NormalizeReward)
    assert isinstance(obs_norm.obs_rms, RunningMeanStd) and isinstance(rew_norm.return_rms, RunningMeanStd)
    obs_norm.obs_rms, rew_norm.return_rms = _as_gymnasiums(obs_norm.obs_rms), _as_gymnasiums(rew_norm.return_rms)
    rng = np.random.default_rng(0)
    obs_a, _ = ours.reset(seed=3)
    obs_b, _ = theirs.reset(seed=3)
    np.testing.assert_array_equal(obs_a, obs_b)
    for _ in range(250):  # past Pendulum's 200-step episodes
        action = rng.uniform(-2, 2, size=(2, 1)).astype(np.float32)
        obs_a, rew_a, *_ = ours.step(action)
        obs_b, rew_b, *_ = theirs.step(action)
        np.testing.assert_array_equal(obs_a, obs_b)
        np.testing.assert_array_equal(rew_a, rew_b)
    assert type(obs_norm.obs_rms) is GymnasiumRunningMeanStd  # the comparison really was against Gymnasium's
    for env in envs:
        env.close()
