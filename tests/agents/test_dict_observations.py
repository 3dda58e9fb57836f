"""Dict observations in the native agents: learning from two keys at once, per-key storage
(uint8 images stay uint8), per-key minibatches, the NaN guard per key, save -> load -> predict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from trpo_lab import ACKTR, NPG, PPO, TRPO, make_vec_env
from trpo_lab.agents.base import OnPolicyAgent
from trpo_lab.distributed import Reducer
from trpo_lab.envs import NonFiniteEnvError
from trpo_lab.envs.visual import DictChoiceEnv
from trpo_lab.rollout.buffer import RolloutBuffer, minibatches

IMAGE = gym.spaces.Box(0, 255, (36, 36, 1), np.uint8)
SMALL_CNN = {"features_extractor_kwargs": {"cnn_output_dim": 16}, "net_arch": [16]}


def _one_key_score(env: DictChoiceEnv, key: str, samples: int = 20_000) -> float:
    """The best score per episode of a policy that reads only ``key`` (Bayes-optimal on a grid)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, samples)
    k = rng.integers(env.n_targets, size=samples)
    right = env.centers[k] > x
    groups = np.digitize(x, np.linspace(-1, 1, 201)) if key == "position" else k
    correct = sum(max(right[groups == g].sum(), (~right[groups == g]).sum()) for g in np.unique(groups))
    return float(correct / samples * env.episode_length)


def test_dict_choice_needs_both_keys() -> None:
    """Random play scores 4 of 8, a policy of one key at most 6: the learning bar of 7 needs both."""
    env = DictChoiceEnv()
    assert _one_key_score(env, "position") == pytest.approx(6.0, abs=0.1)
    assert _one_key_score(env, "target") == pytest.approx(6.0, abs=0.1)
    vec = make_vec_env(DictChoiceEnv, n_envs=4, seed=0)
    rng = np.random.default_rng(0)
    returns: list[float] = []
    vec.reset(seed=0)
    while len(returns) < 200:
        _, _, _, _, infos = vec.step(rng.integers(2, size=4))
        if "_episode" in infos:
            returns.extend(infos["episode"]["r"][infos["_episode"]])
    assert np.mean(returns) == pytest.approx(4.0, abs=0.3)
    vec.close()


@pytest.mark.parametrize(
    ("cls", "timesteps"), [(TRPO, 2048), (NPG, 2048), (PPO, 2048), (ACKTR, 4096)], ids=["trpo", "npg", "ppo", "acktr"]
)
def test_agents_learn_from_both_keys_of_a_dict_observation(cls: type[OnPolicyAgent], timesteps: int) -> None:
    """Above what either key alone allows (6 of 8; 20 episodes of a near-optimal policy vary by ~0.1)."""
    agent = cls(DictChoiceEnv, n_envs=8, seed=0, n_steps=32)
    agent.learn(timesteps)
    assert agent.evaluate(20).mean() >= 7.0


def test_buffer_stores_one_tensor_per_key_and_images_stay_uint8() -> None:
    space = gym.spaces.Dict({"frame": IMAGE, "target": gym.spaces.Discrete(3), "x": gym.spaces.Box(-1, 1, (2,))})
    buffer = RolloutBuffer.for_spaces(space, gym.spaces.Discrete(2), n_steps=3, n_envs=2)
    assert {key: (t.dtype, tuple(t.shape)) for key, t in buffer.observations.items()} == {  # type: ignore[union-attr]
        "frame": (torch.uint8, (3, 2, 36, 36, 1)),
        "target": (torch.long, (3, 2)),
        "x": (torch.float32, (3, 2, 2)),
    }
    rng = np.random.default_rng(0)
    for t in range(3):
        obs = {"frame": np.full((2, 36, 36, 1), 200 + t, np.uint8), "target": np.array([t, 2 - t]),
               "x": rng.uniform(-1, 1, (2, 2)).astype(np.float32)}
        slot = buffer.put_observation(obs)
        np.testing.assert_array_equal(slot["target"], obs["target"])  # a view of the stored slot
        buffer.add(None, np.zeros(2, np.int64), *(np.zeros(2, np.float32),) * 3,
                   np.zeros(2, bool), np.zeros(2, bool), np.array([True, t != 1]))
    buffer.finish(torch.zeros(2), 0.99, 0.95)
    batch = buffer.batch()
    assert batch.size == 5
    assert batch.observations["frame"].dtype == torch.uint8  # type: ignore[index]
    assert batch.observations["frame"][:, 0, 0, 0].tolist() == [200, 200, 201, 202, 202]  # type: ignore[index]
    assert batch.observations["target"].tolist() == [0, 2, 1, 2, 0]  # type: ignore[index]
    # minibatches and the reducer's gather index every key with the same permutation
    reducer = Reducer()
    reducer.share_batch_sizes(batch.size)
    ours = [mb for mb, _ in reducer.shuffled_minibatches(batch, 2, torch.Generator().manual_seed(3))]
    theirs = list(minibatches(batch, 2, torch.Generator().manual_seed(3)))
    for mine, ref in zip(ours, theirs, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(mine.tensors(), ref.tensors(), strict=True))
        pairs = {(int(f), int(t)) for f, t in zip(mine.observations["frame"][:, 0, 0, 0], mine.observations["target"])}  # type: ignore[index]
        assert pairs <= {(200, 0), (200, 2), (201, 1), (202, 2), (202, 0)}
    gathered = reducer.gather_batch(batch)
    assert all(torch.equal(a, b) for a, b in zip(gathered.tensors(), batch.tensors(), strict=True))
    assert set(gathered.observations) == {"frame", "target", "x"}  # type: ignore[arg-type]


class _ImageAndIndexEnv(gym.Env[Any, Any]):
    """A random frame plus a Discrete key (from the env's RNG, which checkpoints hold), for storage and round trips."""

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Dict({"frame": IMAGE, "target": gym.spaces.Discrete(3)})
        self.action_space = gym.spaces.Box(-1, 1, (2,), np.float32)

    def _observation(self) -> dict[str, Any]:
        frame = self.np_random.integers(0, 256, IMAGE.shape, dtype=np.uint8)
        return {"frame": frame, "target": np.int64(self.np_random.integers(3))}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        super().reset(seed=seed)
        return self._observation(), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        return self._observation(), float(np.sum(action)), False, False, {}


def test_agents_store_dict_images_as_uint8_on_their_device() -> None:
    agent = PPO(_ImageAndIndexEnv, n_envs=2, seed=0, n_steps=4, policy_kwargs=SMALL_CNN)
    agent.collect_rollout()
    obs = agent.buffer.observations
    assert isinstance(obs, dict)
    assert obs["frame"].dtype == torch.uint8 and obs["frame"].device == agent.device
    assert obs["frame"].max() > 1  # the frames themselves, not scaled copies
    assert obs["target"].dtype == torch.long


@pytest.mark.parametrize(
    ("cls", "env"),
    [(TRPO, DictChoiceEnv), (NPG, DictChoiceEnv), (PPO, _ImageAndIndexEnv), (ACKTR, _ImageAndIndexEnv)],
    ids=["trpo", "npg", "ppo-image", "acktr-image"],
)
def test_save_load_predict_and_resume_with_dict_observations(tmp_path: Path, cls: type[OnPolicyAgent], env: Any) -> None:
    kwargs = {"policy_kwargs": SMALL_CNN} if env is _ImageAndIndexEnv else {}
    agent = cls(env, n_envs=2, seed=0, n_steps=8, **kwargs)
    agent.learn(32)
    agent.save(tmp_path / "agent.pt")
    loaded = cls.load(tmp_path / "agent.pt", env=env)
    space = agent.observation_space
    assert isinstance(space, gym.spaces.Dict)
    space.seed(1)
    samples = [space.sample() for _ in range(6)]
    batch = {key: np.stack([s[key] for s in samples]) for key in space.spaces}
    actions = agent.predict(batch)
    assert actions.shape[0] == 6
    np.testing.assert_array_equal(actions, loaded.predict(batch))
    np.testing.assert_array_equal(agent.predict(samples[0]), loaded.predict(samples[0]))
    np.testing.assert_allclose(agent.predict(samples[0]), actions[0], rtol=1e-5, atol=1e-6)  # batch-size rounding
    # the environments' position (a dict of arrays) is restored: both continue identically
    assert isinstance(loaded._last_obs, dict)
    for key in space.spaces:
        np.testing.assert_array_equal(loaded._last_obs[key], agent._last_obs[key])
    agent.learn(48)  # the budget counts the loaded agent's 32 steps too
    loaded.learn(48)
    for p, q in zip(agent.policy.state_dict().values(), loaded.policy.state_dict().values(), strict=True):
        assert torch.equal(p, q)


def test_evaluate_runs_on_dict_observations() -> None:
    agent = TRPO(DictChoiceEnv, n_envs=2, seed=0, n_steps=8)
    returns = agent.evaluate(3)
    assert returns.shape == (3,) and ((returns >= 0) & (returns <= 8)).all()


class _NaNAtKeyEnv(DictChoiceEnv):
    """DictChoiceEnv whose position turns NaN at step 3 of each episode."""

    def step(self, action: Any) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = super().step(action)
        if self._t == 3:
            obs["position"] = np.array([np.nan], np.float32)
        return obs, reward, terminated, truncated, info


def test_non_finite_guard_checks_each_dict_key() -> None:
    with pytest.raises(NonFiniteEnvError, match=r"Environment 0 returned a non-finite observation at key 'position' "
                                                 r"\(1 of 1 elements NaN or inf\)"):
        TRPO(_NaNAtKeyEnv, n_envs=2, seed=0, n_steps=8).learn(16)
    agent = TRPO(_NaNAtKeyEnv, n_envs=2, seed=0, n_steps=8, nan_policy="skip")
    agent.learn(16)
    # every 3rd step of each env (the reset after a dropped step starts a new episode): 16 // 3 per env
    assert agent.num_nonfinite_skipped == 2 * (16 // 3)
    assert torch.isfinite(agent.buffer.observations["position"]).all()  # type: ignore[index]


@pytest.mark.parametrize("kwargs", [{"curvature": "exact"}, {"critic_optimizer": "lbfgs"}], ids=["exact", "lbfgs"])
def test_trpo_variants_run_on_dict_observations(kwargs: dict[str, Any]) -> None:
    """The dense Fisher (vmapped over the Dict batch, the Discrete key one-hot inside) and the L-BFGS critic."""
    agent = TRPO(DictChoiceEnv, n_envs=2, seed=0, n_steps=16, **kwargs)
    before = [p.detach().clone() for p in agent.policy.parameters()]
    agent.learn(32)
    after = list(agent.policy.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(p, q) for p, q in zip(before, after, strict=True))


def test_buffer_device_path_stores_dict_observations_as_tensors() -> None:
    """Without numpy views (any device but the CPU) the stored slots come back as tensors per key."""
    space = gym.spaces.Dict({"frame": IMAGE, "target": gym.spaces.Discrete(3)})
    buffer = RolloutBuffer.for_spaces(space, gym.spaces.Discrete(2), n_steps=2, n_envs=2)
    buffer._numpy = None  # what a CUDA buffer has
    obs = {"frame": np.full((2, 36, 36, 1), 7, np.uint8), "target": np.array([1, 2])}
    slot = buffer.put_observation(obs)
    assert isinstance(slot["frame"], torch.Tensor) and slot["frame"].dtype == torch.uint8
    assert slot["target"].tolist() == [1, 2]
    buffer.add({key: np.asarray(v) for key, v in obs.items()}, np.zeros(2, np.int64), *(np.zeros(2, np.float32),) * 3,
               np.zeros(2, bool), np.zeros(2, bool), np.ones(2, bool))
    assert buffer.observations["target"][0].tolist() == [1, 2]  # type: ignore[index]
