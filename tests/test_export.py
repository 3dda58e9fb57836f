"""ONNX export (trpo_lab/export.py): onnxruntime's actions equal ``agent.predict(obs, deterministic=True)``.

Every case trains a few updates with observation normalization on, so the folded-in running
statistics are far from the identity, and feeds observations well outside the training
distribution (where clipping and near-ties would show a difference).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from trpo_lab import PPO, TRPO
from trpo_lab.agents.base import OnPolicyAgent
from trpo_lab.envs import running_statistics
from trpo_lab.export import INPUT_NAME, OUTPUT_NAME, export_onnx

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


class MultiDiscreteEnv(gym.Env[np.ndarray, np.ndarray]):
    """Box observations, MultiDiscrete actions; the reward favours action (2, 0)."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
    action_space = gym.spaces.MultiDiscrete([3, 4])

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return self.observation_space.sample() * 0.5 + 0.3, {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        reward = float(action[0] == 2) + float(action[1] == 0)
        return self.observation_space.sample() * 0.5 + 0.3, reward, False, False, {}


def _observations(agent: OnPolicyAgent, n: int = 512) -> np.ndarray:
    space = agent.observation_space
    rng = np.random.default_rng(0)
    if isinstance(space, gym.spaces.Discrete):
        return rng.integers(0, int(space.n), size=n).astype(np.int64)
    # far outside the running mean +- a few std, and on both sides of it
    return (rng.normal(size=(n, *space.shape)) * 5.0).astype(np.float32)


def _onnx_actions(path: Path, obs: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [INPUT_NAME]
    assert [o.name for o in session.get_outputs()] == [OUTPUT_NAME]
    actions: np.ndarray = session.run([OUTPUT_NAME], {INPUT_NAME: obs})[0]
    return actions


def _assert_same_actions(agent: OnPolicyAgent, path: Path) -> None:
    obs = _observations(agent)
    expected = agent.predict(obs, deterministic=True)
    actions = _onnx_actions(path, obs)
    assert actions.shape == expected.shape and actions.dtype == expected.dtype
    if isinstance(agent.action_space, gym.spaces.Box):
        # float32 matmuls of two libraries: equal to rounding. The Box case's head is scaled 300x,
        # so the rounding of a 64-term float32 sum (~1e-7 relative) reaches a few 1e-5 in the
        # action; one seed's weights gave 1.4e-5 at an action of -0.039.
        np.testing.assert_allclose(actions, expected, rtol=1e-4, atol=5e-5)
    else:
        np.testing.assert_array_equal(actions, expected)
    # a batch of one, and the single-observation form of predict
    np.testing.assert_allclose(_onnx_actions(path, obs[:1])[0], agent.predict(obs[0]), rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda: PPO("CartPole-v1", n_envs=2, n_steps=64, n_epochs=2, normalize_obs=True, seed=0), "Discrete"),
        (lambda: TRPO("Pendulum-v1", n_envs=2, n_steps=64, normalize_obs=True, seed=1), "Box"),
        (lambda: TRPO(MultiDiscreteEnv, n_envs=2, n_steps=64, normalize_obs=True, seed=2), "MultiDiscrete"),
    ],
    ids=["Discrete", "Box", "MultiDiscrete"],
)
def test_onnx_actions_equal_predict(tmp_path: Path, make: Any, kind: str) -> None:
    agent = make()
    try:
        agent.learn(512, tensorboard=False)
        assert type(agent.action_space).__name__ == kind
        rms = running_statistics(agent.env)["obs_rms"]
        assert np.abs(rms.mean).max() > 1e-3 and np.abs(rms.var - 1).max() > 1e-2, "normalization is near identity"
        if kind == "Box":
            # push the means past the bounds so that the clipping is exercised
            with torch.no_grad():
                agent.policy.actor_linears[-1].weight.mul_(300.0)
            raw = agent.policy.act(torch.as_tensor(_observations(agent)), deterministic=True)[0]
            assert (raw.abs() > 2.0).any(), "no action beyond Pendulum's bounds [-2, 2]"
        path = export_onnx(agent, tmp_path / "policy.onnx")
        _assert_same_actions(agent, path)
        session_meta = ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map
        assert session_meta["trpo_lab.algo"] == agent.algo
        assert session_meta["trpo_lab.normalize_obs"] == "true"
    finally:
        agent.close()


def test_discrete_observations_and_no_normalization(tmp_path: Path) -> None:
    agent = TRPO("FrozenLake-v1", n_envs=1, n_steps=32, seed=0)
    try:
        agent.learn(64, tensorboard=False)
        path = export_onnx(agent, tmp_path / "sub" / "frozenlake.onnx")  # folders are created
        _assert_same_actions(agent, path)
    finally:
        agent.close()


def test_a_bfloat16_image_policy_is_exported_in_float32(tmp_path: Path) -> None:
    """onnxruntime's convolutions take no bfloat16: the export runs the Nature CNN in float32
    (and leaves the agent's own network in bfloat16), so its actions are those of the float32
    network with the same weights."""
    from trpo_lab.envs.visual import VisualChoiceEnv
    from trpo_lab.nn.extractors import NatureCNN

    kwargs = {"features_extractor_kwargs": {"features_dim": 32, "compute_dtype": "bfloat16"}}
    agent = PPO(lambda: VisualChoiceEnv(size=36), n_envs=2, n_steps=16, seed=0, policy_kwargs=kwargs)
    try:
        agent.learn(64, tensorboard=False)
        path = export_onnx(agent, tmp_path / "visual.onnx")
        cnn = next(m for m in agent.policy.modules() if isinstance(m, NatureCNN))
        assert cnn.compute_dtype == torch.bfloat16
        obs = np.stack([agent.observation_space.sample() for _ in range(256)])
        actions = _onnx_actions(path, obs.astype(np.float32))
        cnn.compute_dtype = torch.float32
        np.testing.assert_array_equal(actions, agent.predict(obs, deterministic=True))
    finally:
        agent.close()


def test_cli_export_of_a_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trpo_lab.cli import main

    run_dir = tmp_path / "run"
    agent = PPO("CartPole-v1", n_envs=2, n_steps=32, n_epochs=1, normalize_obs=True, seed=3)
    agent.learn(128, run_dir=run_dir, tensorboard=False)
    agent.close()
    out = tmp_path / "cartpole.onnx"
    assert main(["export", str(run_dir), "--onnx", str(out)]) == 0
    assert f"written to {out}" in capsys.readouterr().out
    loaded = OnPolicyAgent.load(run_dir / "final.pt", n_envs=1)
    try:
        _assert_same_actions(loaded, out)
    finally:
        loaded.close()
    assert not list(tmp_path.glob(".cartpole.onnx.*")), "a temporary file was left behind"
