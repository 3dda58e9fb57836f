"""Bad input at every door (issue #9): Python constructors, configs, TOML presets, checkpoints, CLI.

Every case asserts the message (the field, the value, what is allowed), not only the type.
Python doors raise ``ValueError``; the CLI exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from trpo_lab import make_vec_env
from trpo_lab.agents import agent_class
from trpo_lab.agents.base import OnPolicyAgent
from trpo_lab.agents.trpo import TRPO
from trpo_lab.config import ACKTRConfig, PPOConfig, TRPOConfig, config_class, load_toml, parse_set_option
from trpo_lab.envs.torch_cartpole import TorchCartPole
from trpo_lab.envs.visual import DictChoiceEnv
from trpo_lab.experiments.tune import load_space, parse_space
from trpo_lab.presets import load_preset

BOX = gym.spaces.Box(-1, 1, (3,), np.float32)
CODE = "__import__('os').system('touch {marker}')"


class SpaceEnv(gym.Env[Any, Any]):
    """An env with the given spaces (sampled observations, zero rewards)."""

    def __init__(self, observation_space: gym.Space, action_space: gym.Space) -> None:
        self.observation_space, self.action_space = observation_space, action_space

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        return self.observation_space.sample(), 0.0, False, False, {}


def spaces(observation_space: gym.Space, action_space: gym.Space) -> Callable[[], gym.Env]:
    return lambda: SpaceEnv(observation_space, action_space)


def trpo(**kwargs: Any) -> Callable[[dict[str, Path]], Any]:
    env = kwargs.pop("env", "CartPole-v1")
    kwargs.setdefault("n_envs", 1)
    kwargs.setdefault("n_steps", 8)
    return lambda files: TRPO(env, **kwargs)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A good checkpoint and damaged, foreign and crafted variants of it; TOML files."""
    folder = tmp_path_factory.mktemp("bad_input")
    good = folder / "good.pt"
    agent = TRPO("CartPole-v1", n_envs=1, seed=0, n_steps=8)
    agent.save(good)
    raw = good.read_bytes()
    paths = {"good": good, "folder": folder, "marker": folder / "pwned"}

    def variant(name: str, change: Callable[[dict[str, Any]], None]) -> None:
        data = torch.load(good, weights_only=True)
        change(data)
        torch.save(data, folder / f"{name}.pt")
        paths[name] = folder / f"{name}.pt"

    (folder / "empty.pt").write_bytes(b"")
    (folder / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (folder / "garbage.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"weights": torch.zeros(3)}, folder / "foreign.pt")
    paths.update({name: folder / f"{name}.pt" for name in ("empty", "truncated", "garbage", "foreign")})
    variant("newer", lambda d: d.update(format="trpo_lab.agent/2"))
    variant("no_policy", lambda d: d.pop("policy"))
    variant("n_envs_str", lambda d: d.update(n_envs="1"))
    variant("ppo", lambda d: d.update(algo="ppo"))
    variant("sac", lambda d: d.update(algo="sac"))
    variant("bad_gamma", lambda d: d["config"].update(gamma=2.0))
    variant("other_net", lambda d: d["config"].update(policy_kwargs={"net_arch": [8, 8]}))
    variant("other_depth", lambda d: d["config"].update(policy_kwargs={"net_arch": [8]}))

    class RunsCode:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {paths['marker']}",))

    variant("evil", lambda d: d["counters"].update(num_updates=RunsCode()))
    (folder / "evil_raw.pt").write_bytes(pickle.dumps({"format": "trpo_lab.agent/1", "x": RunsCode()}))
    paths["evil_raw"] = folder / "evil_raw.pt"

    (folder / "broken.toml").write_text("[default]\nn_steps = = 3\n")
    (folder / "latin1.toml").write_bytes("name = 'caf\xe9'\n".encode("latin-1"))
    paths.update({"broken_toml": folder / "broken.toml", "latin1_toml": folder / "latin1.toml"})
    for name, text in {
        "typo": "[default]\ngama = 0.9\n",
        "wrong_type": "[default]\nn_steps = \"64\"\n",
        "code": f"[default]\npolicy_kwargs = {{ activation_fn = \"{CODE.format(marker=paths['marker'])}\" }}\n",
        "not_table": "default = 3\n",
        "syntax": "[default\n",
    }.items():
        (folder / name / "agents").mkdir(parents=True)
        (folder / name / "agents" / "trpo.toml").write_text(text)
        paths[f"presets_{name}"] = folder / name
    for name, text in {
        "typo": "gama = { choices = [0.9, 0.99] }\n",
        "policy_typo": "policy_kwargs.net_arc = { choices = [[64]] }\n",
        "empty": "# nothing to search\n",
        "reversed": "learning_rate = { low = 1e-2, high = 1e-5, log = true }\n",
        "out_of_range": "gamma = { choices = [0.99, 1.5] }\n",
        "no_bounds": "learning_rate = { lo = 1e-5 }\n",
        "bare": "gamma = 0.99\n",
    }.items():
        (folder / f"space_{name}.toml").write_text(text)
        paths[f"space_{name}"] = folder / f"space_{name}.toml"
    return paths


def preset(name: str) -> Callable[[dict[str, Path]], Any]:
    def load(files: dict[str, Path]) -> Any:
        previous = os.environ.get("TRPO_LAB_PRESETS")
        os.environ["TRPO_LAB_PRESETS"] = str(files[f"presets_{name}"])
        try:
            return load_preset("trpo", "CartPole-v1")
        finally:
            if previous is None:
                del os.environ["TRPO_LAB_PRESETS"]
            else:
                os.environ["TRPO_LAB_PRESETS"] = previous

    return load


def load(name: str, cls: type[OnPolicyAgent] = TRPO, **kwargs: Any) -> Callable[[dict[str, Path]], Any]:
    return lambda files: cls.load(files[name], **kwargs)


def run_dir_under_a_file(files: dict[str, Path]) -> Any:
    return TRPO("CartPole-v1", n_envs=1, n_steps=8).learn(8, run_dir=files["good"] / "run")


# (id, call, message regex)
PYTHON_CASES: list[tuple[str, Callable[[dict[str, Path]], Any], str]] = [
    # names
    ("unknown algorithm", lambda f: agent_class("sac"), r"Unknown algorithm 'sac'; expected one of acktr, npg, ppo, trpo"),
    ("unknown algorithm config", lambda f: config_class("SAC"), r"Unknown algorithm 'SAC'; expected one of"),
    ("unknown env id", trpo(env="CartPol-v1"), r"Unknown environment id 'CartPol-v1'; did you mean CartPole-v1"),
    ("unknown hyperparameter", trpo(cg_dampin=0.1), r"Unknown hyperparameter 'cg_dampin' for trpo; did you mean cg_damping"),
    # types
    ("n_steps str", trpo(n_steps="64"), r"Invalid n_steps: '64' \(str\); expected an integer"),
    ("n_steps float", trpo(n_steps=64.0), r"Invalid n_steps: 64.0 \(float\); expected an integer"),
    ("normalize_obs str", trpo(normalize_obs="yes"), r"Invalid normalize_obs: 'yes' \(str\); expected true or false"),
    ("learning_rate bool", trpo(learning_rate=True), r"Invalid learning_rate: True \(bool\); expected a number"),
    ("gamma nan", trpo(gamma=float("nan")), r"Invalid gamma: nan \(float\); expected a finite number"),
    ("seed str", trpo(seed="a"), r"Invalid seed: 'a'; expected an integer"),
    ("policy_kwargs list", trpo(policy_kwargs=[64]), r"Invalid policy_kwargs: \[64\] \(list\); expected a table / dict"),
    # ranges
    ("learning_rate < 0", trpo(learning_rate=-1e-3), r"Invalid learning_rate: -0.001; expected > 0"),
    ("target_kl = 0", trpo(target_kl=0), r"Invalid target_kl: 0.0; expected > 0"),
    ("gamma = 0", trpo(gamma=0), r"Invalid gamma: 0.0; expected in \(0, 1\]"),
    ("gamma > 1", trpo(gamma=1.01), r"Invalid gamma: 1.01; expected in \(0, 1\]"),
    ("gae_lambda < 0", trpo(gae_lambda=-0.1), r"Invalid gae_lambda: -0.1; expected in \[0, 1\]"),
    ("n_envs = 0", trpo(n_envs=0), r"Invalid n_envs: 0; expected an integer >= 1"),
    ("n_envs float", trpo(n_envs=2.5), r"Invalid n_envs: 2.5; expected an integer >= 1"),
    ("n_steps = 0", trpo(n_steps=0), r"Invalid n_steps: 0; expected >= 1"),
    ("batch_size = 0", trpo(batch_size=0), r"Invalid batch_size: 0; expected >= 1"),
    ("checkpoint_every < 0", trpo(checkpoint_every=-1), r"Invalid checkpoint_every: -1; expected >= 0 \(0 disables\)"),
    ("nan_policy", trpo(nan_policy="ignore"), r"Invalid nan_policy: 'ignore'; expected 'raise' or 'skip'"),
    ("cg_max_steps = 0", trpo(cg_max_steps=0), r"Invalid cg_max_steps: 0; expected >= 1"),
    ("line search factor = 1", lambda f: TRPOConfig(line_search_shrinking_factor=1.0),
     r"Invalid line_search_shrinking_factor: 1.0; expected in \(0, 1\)"),
    ("ppo clip_range = 0", lambda f: PPOConfig(clip_range=0), r"Invalid clip_range: 0.0; expected > 0"),
    ("ppo n_epochs = 0", lambda f: PPOConfig(n_epochs=0), r"Invalid n_epochs: 0; expected >= 1"),
    ("acktr kl_clip = 0", lambda f: ACKTRConfig(kl_clip=0), r"Invalid kl_clip: 0.0; expected > 0"),
    ("acktr target_kl = 0", lambda f: ACKTRConfig(target_kl=0), r"Invalid target_kl: 0.0; expected > 0 or none"),
    ("from_preset unknown env", lambda f: TRPO.from_preset("Pendulum-v0"), r"Unknown environment id 'Pendulum-v0'"),
    ("from_preset bad override", lambda f: TRPO.from_preset("CartPole-v1", n_steps=0), r"Invalid n_steps: 0; expected >= 1"),
    ("acktr momentum = 1", lambda f: ACKTRConfig(momentum=1.0), r"Invalid momentum: 1.0; expected in \[0, 1\)"),
    ("n_steps beyond memory", trpo(n_steps=10**13), r"Invalid n_steps: 10000000000000; this trpo with n_envs 1 \(.*"
                                                    r"rollout buffer .*\) needs an estimated .* TiB, more than the .* of "
                                                    r"available memory .*; n_steps \d+ would fit"),
    # memory estimates, checked before anything is allocated (issue #18)
    ("net_arch beyond memory", trpo(policy_kwargs={"net_arch": [100_000, 100_000]}),
     r"Invalid policy_kwargs.net_arch: \[100000, 100000\]; this trpo with n_envs 1 \(.*parameters 74.5 GiB.*\) needs "
     r"an estimated .* GiB, more than the .* of available memory .*; net_arch \[\d+, \d+\] would fit"),
    ("net_arch beyond max_memory", trpo(policy_kwargs={"net_arch": [256, 256]}, max_memory="1MB"),
     r"Invalid policy_kwargs.net_arch: \[256, 256\]; this trpo .* needs an estimated .*, more than the max_memory "
     r"limit of 976.6 KiB; net_arch \[\d+, \d+\] would fit$"),
    ("n_steps beyond max_memory", trpo(n_steps=4096, max_memory="2MB"),
     r"Invalid n_steps: 4096; .* more than the max_memory limit of 1.9 MiB; n_steps \d+ would fit$"),
    ("K-FAC factors beyond max_memory", lambda f: agent_class("acktr")("CartPole-v1", n_envs=1, n_steps=1,
                                                                       policy_kwargs={"net_arch": [2048]}, max_memory="40MB"),
     r"Invalid policy_kwargs.net_arch: \[2048\]; this acktr .*K-FAC factors .* MiB.* more than the max_memory limit"),
    ("Shampoo beyond max_memory", trpo(curvature="shampoo", n_steps=1, policy_kwargs={"net_arch": [1024, 1024]},
                                       max_memory="40MB"),
     r"Invalid policy_kwargs.net_arch: \[1024, 1024\]; .*Shampoo preconditioners .* MiB"),
    ("exact Fisher beyond max_memory", trpo(curvature="exact", n_steps=1, policy_kwargs={"net_arch": [32]},
                                            max_memory="200KB"),
     r"Invalid policy_kwargs.net_arch: \[32\]; .*exact Fisher .* KiB"),
    ("image buffer beyond max_memory", trpo(env=spaces(gym.spaces.Box(0, 255, (84, 84, 4), np.uint8), gym.spaces.Discrete(2)),
                                            n_steps=2048, policy_kwargs={"net_arch": [8]}, max_memory="100MB"),
     r"Invalid n_steps: 2048; this trpo with n_envs 1 \(.*rollout buffer 110.3 MiB.*\) .* n_steps \d+ would fit"),
    ("max_memory text", lambda f: TRPOConfig(max_memory="lots"),
     r"Invalid max_memory: 'lots'; expected a positive number of bytes or a size such as '8GB'"),
    ("max_memory 0", lambda f: TRPOConfig(max_memory=0), r"Invalid max_memory: 0; expected a positive number of bytes"),
    # policy_kwargs (validated with the config, before any network is built)
    ("policy_kwargs key", lambda f: TRPOConfig(policy_kwargs={"net_arc": [8]}),
     r"Invalid policy_kwargs key\(s\) \['net_arc'\]; expected some of \['net_arch', 'activation_fn', 'log_std_init'"),
    ("net_arch negative", lambda f: TRPOConfig(policy_kwargs={"net_arch": [64, -1]}),
     r"Invalid policy_kwargs.net_arch pi: \[64, -1\]; expected positive integers"),
    ("net_arch dict key", lambda f: TRPOConfig(policy_kwargs={"net_arch": {"pi": [8], "q": [8]}}),
     r"Invalid policy_kwargs.net_arch key\(s\) \['q'\]; expected 'pi' and/or 'vf'"),
    ("activation_fn code", lambda f: TRPOConfig(policy_kwargs={"activation_fn": CODE.format(marker=f["marker"])}),
     r"Invalid policy_kwargs.activation_fn: \"__import__\('os'\).*; expected one of \['elu', 'gelu'"),
    ("log_std_init str", lambda f: TRPOConfig(policy_kwargs={"log_std_init": "x"}),
     r"Invalid policy_kwargs.log_std_init: 'x'; expected a finite number"),
    ("ortho_init str", lambda f: TRPOConfig(policy_kwargs={"ortho_init": "yes"}),
     r"Invalid policy_kwargs.ortho_init: 'yes'; expected true or false"),
    # construction arguments
    ("device", trpo(device="tpu"), r"Invalid device: 'tpu'; expected 'cpu', 'cuda', 'cuda:N' or 'auto'"),
    ("sync_free not a bool", trpo(sync_free="yes"), r"Invalid sync_free: 'yes' \(str\); expected true or false"),
    ("torch env with skip", trpo(env=TorchCartPole(2), nan_policy="skip"),
     r"Invalid nan_policy: 'skip' for a torch vector env; it applies to numpy environments only"),
    ("torch env num_envs", lambda f: TorchCartPole(0), r"Invalid num_envs: 0; expected an integer >= 1"),
    ("vectorization", trpo(vectorization="threads"), r"Invalid vectorization: 'threads'; expected 'sync', 'async'"),
    ("env not an id", trpo(env=123), r"Invalid env: 123; expected a Gymnasium id or a callable returning a gymnasium.Env"),
    ("factory returns no env", trpo(env=lambda: 42),
     r"Invalid env: the factory .* returned 42 \(int\); expected a gymnasium.Env"),
    ("env_kwargs unknown", trpo(env_kwargs={"foo": 1}),
     r"Invalid env_kwargs \{'foo': 1\} for 'CartPole-v1': .*unexpected keyword argument 'foo'"),
    ("env_kwargs not a dict", trpo(env_kwargs=[1]), r"Invalid env_kwargs: \[1\]; expected a dict of keyword arguments"),
    ("skip without partial resets", trpo(vectorization="vector_entry_point", nan_policy="skip", n_envs=2),
     r"Invalid nan_policy: 'skip' needs a vector env that can reset single sub-environments .* not CartPoleVectorEnv"),
    # spaces
    ("Tuple in Dict observations", trpo(env=spaces(gym.spaces.Dict({"a": BOX, "t": gym.spaces.Tuple((BOX,))}),
                                                   gym.spaces.Discrete(2))),
     r"Unsupported observation space Tuple\(Box.* at key 't'; supported: Box and Discrete"),
    ("MultiBinary in Dict observations", trpo(env=spaces(gym.spaces.Dict({"m": gym.spaces.MultiBinary(3)}),
                                                         gym.spaces.Discrete(2))),
     r"Unsupported observation space MultiBinary\(3\) at key 'm'; supported: Box and Discrete"),
    ("normalize_obs with Dict observations", trpo(env=DictChoiceEnv, normalize_obs=True),
     r"Invalid normalize_obs: True for .*DictChoiceEnv.*, whose observations are a Dict \(keys \['position', 'target'\]\); "
     r".*set normalize_obs=False"),
    ("ONNX export of Dict observations",
     lambda f: __import__("trpo_lab.export", fromlist=["export_onnx"]).export_onnx(
         TRPO(DictChoiceEnv, n_envs=1, n_steps=8), f["folder"] / "policy.onnx"),
     r"Cannot export to ONNX a policy of Dict observations Dict\('position'.*: the exported graph takes one observation "
     r"tensor \(Box or Discrete\)"),
    ("predict with a Dict key missing", lambda f: TRPO(DictChoiceEnv, n_envs=1, n_steps=8).predict({"position": [0.5]}),
     r"Invalid observation \['position'\]; expected a dict with the keys \['position', 'target'\] of the Dict space"),
    ("predict with Dict batch sizes that differ",
     lambda f: TRPO(DictChoiceEnv, n_envs=1, n_steps=8).predict({"position": np.zeros((3, 1)), "target": np.zeros(2)}),
     r"Invalid observation shapes \{'position': \(3, 1\), 'target': \(2,\)\}; expected \{'position': \(1,\), "
     r"'target': \(\)\} for one observation, or each key's shape with the same leading batch size"),
    ("Tuple observations", trpo(env=spaces(gym.spaces.Tuple((BOX,)), gym.spaces.Discrete(2))),
     r"Unsupported observation space Tuple\(Box.*; supported: Box and Discrete"),
    ("Text observations", trpo(env=spaces(gym.spaces.Text(5), gym.spaces.Discrete(2))),
     r"Unsupported observation space Text\(1, 5.*; supported: Box and Discrete"),
    ("MultiBinary observations", trpo(env=spaces(gym.spaces.MultiBinary(3), gym.spaces.Discrete(2))),
     r"Unsupported observation space MultiBinary\(3\); supported: Box and Discrete"),
    ("Discrete observations from 1", trpo(env=spaces(gym.spaces.Discrete(3, start=1), gym.spaces.Discrete(2))),
     r"Unsupported observation space Discrete\(3, start=1\): start=1; supported: Discrete / MultiDiscrete starting at 0"),
    ("nested Dict observations", trpo(env=spaces(gym.spaces.Dict({"a": gym.spaces.Dict({"b": BOX})}), gym.spaces.Discrete(2))),
     r"Unsupported observation space Dict\('b': Box.* at key 'a': a nested Dict; supported: Box and Discrete"),
    ("Graph observations", trpo(env=spaces(gym.spaces.Graph(BOX, None), gym.spaces.Discrete(2))),
     r"Unsupported observation space Graph\(.*; supported: Box and Discrete"),
    ("float images for nature_cnn", trpo(env=spaces(gym.spaces.Box(0, 1, (36, 36, 3), np.float32), gym.spaces.Discrete(2)),
                                         policy_kwargs={"features_extractor": "nature_cnn"}),
     r"Unsupported observation space Box\(0.0, 1.0, \(36, 36, 3\), float32\) for nature_cnn with normalize_images=True: "
     r"expected dtype uint8 with bounds \[0, 255\]"),
    ("unknown features_extractor", trpo(policy_kwargs={"features_extractor": "resnet"}),
     r"Invalid policy_kwargs.features_extractor: 'resnet'; expected one of \['auto', 'mlp', 'nature_cnn'\]"),
    ("shared trunk in TRPO", trpo(env=spaces(gym.spaces.Box(0, 255, (36, 36, 1), np.uint8), gym.spaces.Discrete(2)),
                                  policy_kwargs={"share_features_extractor": True}),
     r"Invalid policy_kwargs.share_features_extractor: True for TRPO; its trust region constrains the actor alone"),
    ("Atari option", lambda f: make_vec_env("ALE/Pong-v5", env_kwargs={"frame_skip": 0}),
     r"Invalid frame_skip: 0; expected an integer >= 1"),
    ("MultiBinary actions", trpo(env=spaces(BOX, gym.spaces.MultiBinary(3))),
     r"Unsupported action space MultiBinary\(3\); supported: Discrete, Box \(1-D\) and MultiDiscrete"),
    ("Dict actions", trpo(env=spaces(BOX, gym.spaces.Dict({"a": gym.spaces.Discrete(2)}))),
     r"Unsupported action space Dict\('a': Discrete\(2\)\); supported: Discrete, Box \(1-D\) and MultiDiscrete"),
    ("Discrete actions from 1", trpo(env=spaces(BOX, gym.spaces.Discrete(3, start=1))),
     r"Unsupported action space Discrete\(3, start=1\): start=1"),
    ("2-D Box actions", trpo(env=spaces(BOX, gym.spaces.Box(-1, 1, (2, 2)))),
     r"Unsupported action space Box\(-1.0, 1.0, \(2, 2\), float32\): Box actions must be one-dimensional"),
    # methods
    ("learn 0 steps", lambda f: trpo()(f).learn(0), r"Invalid total_timesteps: 0; expected an integer >= 1"),
    ("learn float steps", lambda f: trpo()(f).learn(1e3), r"Invalid total_timesteps: 1000.0; expected an integer >= 1"),
    ("run_dir under a file", run_dir_under_a_file, r"Invalid run_dir: .*good.pt/run; cannot write there \(Not a directory\)"),
    ("predict shape", lambda f: trpo()(f).predict(np.zeros(5)), r"Invalid observation shape \(5,\); expected \(4,\)"),
    ("evaluate 0 episodes", lambda f: trpo()(f).evaluate(0), r"Invalid n_episodes: 0; expected >= 1"),
    # checkpoints
    ("checkpoint missing", lambda f: TRPO.load(f["folder"] / "nothing.pt"), r"Checkpoint not found: .*nothing.pt"),
    ("checkpoint empty", load("empty"), r"Cannot load checkpoint .*empty.pt: the file is empty"),
    ("checkpoint truncated", load("truncated"),
     r"Cannot load checkpoint .*truncated.pt: the file is truncated or corrupt \(.+\)$"),
    ("checkpoint garbage", load("garbage"), r"Cannot load checkpoint .*garbage.pt: not a weights-only PyTorch checkpoint"),
    ("checkpoint of another program", load("foreign"),
     r"Cannot load checkpoint .*foreign.pt: not a trpo_lab checkpoint \(format trpo_lab.agent/1\)"),
    ("checkpoint newer format", load("newer"),
     r"Cannot load checkpoint .*newer.pt: format 'trpo_lab.agent/2'; this version of trpo_lab reads 'trpo_lab.agent/1'"),
    ("checkpoint missing field", load("no_policy"), r"Cannot load checkpoint .*: field 'policy' is missing"),
    ("checkpoint mistyped field", load("n_envs_str"), r"Cannot load checkpoint .*: field 'n_envs' is a str; expected int"),
    ("checkpoint other algorithm", load("ppo"), r"Checkpoint .*ppo.pt holds a 'ppo' agent; load it with PPO.load"),
    ("checkpoint unknown algorithm", load("sac", OnPolicyAgent), r"Checkpoint .*sac.pt: Unknown algorithm 'sac'"),
    ("checkpoint other env", load("good", env="Acrobot-v1"),
     r"Checkpoint observation_space \{'type': 'Box', 'shape': \[4\]\} does not match the environment's "
     r"\{'type': 'Box', 'shape': \[6\]\}"),
    ("checkpoint invalid config", load("bad_gamma"), r"Checkpoint .*bad_gamma.pt: Invalid gamma: 2.0; expected in \(0, 1\]"),
    ("checkpoint other network", load("other_net"),
     r"Checkpoint policy parameter 'actor.0.weight' has shape \(64, 4\); this network needs \(8, 4\)"),
    ("checkpoint other depth", load("other_depth"),
     r"Checkpoint policy does not fit this network: extra parameters \['actor.4.bias', 'actor.4.weight', "
     r"'critic.4.bias', 'critic.4.weight'\], missing \[\] \(another policy_kwargs.net_arch\?\)"),
    ("checkpoint that runs code", load("evil"),
     r"Cannot load checkpoint .*evil.pt: refused, it refers to Python code or classes \(.*GLOBAL (posix|os).system"),
    ("raw pickle that runs code", load("evil_raw"), r"Cannot load checkpoint .*evil_raw.pt: not a weights-only"),
    # TOML and --set
    ("TOML missing", lambda f: load_toml(f["folder"] / "none.toml"), r"TOML file not found: .*none.toml"),
    ("TOML syntax", lambda f: load_toml(f["broken_toml"]), r"Unreadable TOML in .*broken.toml: .*\(at line 2"),
    ("TOML not UTF-8", lambda f: load_toml(f["latin1_toml"]), r"Cannot read TOML file .*latin1.toml"),
    ("preset syntax", preset("syntax"), r"Unreadable TOML in .*syntax/agents/trpo.toml"),
    ("preset unknown key", preset("typo"),
     r"Invalid preset .*typo/agents/trpo.toml for CartPole-v1: Unknown hyperparameter 'gama' for trpo; did you mean gamma"),
    ("preset wrong type", preset("wrong_type"), r"Invalid preset .*: Invalid n_steps: '64' \(str\); expected an integer"),
    ("preset with code", preset("code"), r"Invalid preset .*code/agents/trpo.toml for CartPole-v1: "
                                         r"Invalid policy_kwargs.activation_fn: \"__import__\('os'\)"),
    ("preset not a table", preset("not_table"), r"Invalid preset .*: \[default\] must be a table, got 3"),
    ("--set without =", lambda f: parse_set_option("gamma", {}), r"Invalid --set 'gamma'; expected key=value"),
    # tune search spaces
    ("space unknown key", lambda f: load_space("trpo", f["space_typo"]),
     r"Invalid search space .*space_typo.toml: Unknown hyperparameter 'gama' for trpo; did you mean gamma"),
    ("space empty", lambda f: parse_space("ppo", {}), r"Invalid search space .*: it is empty; expected at least one"),
    ("space not a distribution", lambda f: load_space("trpo", f["space_bare"]),
     r"Invalid search space .*: gamma = 0.99; expected a table such as \{ choices = \[...\] \}"),
    ("space bad choice", lambda f: load_space("trpo", f["space_out_of_range"]),
     r"Invalid search space .*: gamma: Invalid gamma: 1.5; expected in \(0, 1\]"),
    ("space int bounds on a float", lambda f: parse_space("ppo", {"n_epochs": {"low": 1.0, "high": 4.0}}),
     r"Invalid search space .*: n_epochs: Invalid n_epochs: 1.0 \(float\); expected an integer"),
    ("space log from 0", lambda f: parse_space("ppo", {"ent_coef": {"low": 0.0, "high": 0.1, "log": True}}),
     r"ent_coef: log = true needs low > 0, got low = 0.0"),
    ("space empty choices", lambda f: parse_space("ppo", {"n_epochs": {"choices": []}}),
     r"n_epochs: choices = \[\]; expected a non-empty array"),
    ("--set into a value", lambda f: parse_set_option("gamma.x=1", {"gamma": 0.9}),
     r"Invalid --set 'gamma.x=1': 'gamma' is not a table"),
]


@pytest.mark.parametrize(("call", "message"), [pytest.param(c, m, id=i) for i, c, m in PYTHON_CASES])
def test_python_doors_raise_value_error_naming_the_problem(
    files: dict[str, Path], call: Callable[[dict[str, Path]], Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message) as info:
        call(files)
    assert "\n" not in str(info.value)
    assert not files["marker"].exists(), "a crafted input ran code"


def test_there_are_at_least_30_cases() -> None:
    assert len(PYTHON_CASES) >= 30 and len(CLI_CASES) >= 20


# ---------------------------------------------------------------------------------- the CLI
def _resume_dir(files: dict[str, Path], checkpoint: str, config: str = 'algo = "trpo"\ntotal_timesteps = 100\n') -> str:
    folder = files["folder"] / f"resume_{checkpoint}"
    folder.mkdir(exist_ok=True)
    (folder / "config.toml").write_text(config)
    (folder / "checkpoint.pt").write_bytes(files[checkpoint].read_bytes())
    (folder / "final.pt").write_bytes(files[checkpoint].read_bytes())
    return str(folder)


TRAIN = ["train", "trpo", "CartPole-v1", "--steps", "100", "--set", "n_steps=8"]  # a whole rollout: no budget warning
CLI_CASES: list[tuple[str, Callable[[dict[str, Path]], list[str]], str]] = [
    ("unknown algorithm", lambda f: ["train", "sac", "CartPole-v1"], r"Unknown algorithm 'sac'"),
    ("unknown env", lambda f: ["train", "trpo", "CartPol-v1"], r"Unknown environment id 'CartPol-v1'; did you mean"),
    ("unknown --set key", lambda f: [*TRAIN, "--set", "gama=0.9"], r"Unknown hyperparameter 'gama' for trpo"),
    ("gamma 0", lambda f: [*TRAIN, "--set", "gamma=0"], r"Invalid gamma: 0.0; expected in \(0, 1\]"),
    ("negative lr", lambda f: [*TRAIN, "--set", "learning_rate=-1e-3"], r"Invalid learning_rate: -0.001; expected > 0"),
    ("KL limit 0", lambda f: [*TRAIN, "--set", "target_kl=0"], r"Invalid target_kl: 0.0; expected > 0"),
    ("n_steps float", lambda f: [*TRAIN, "--set", "n_steps=1.5"], r"Invalid n_steps: 1.5 \(float\); expected an integer"),
    ("n_steps text", lambda f: [*TRAIN, "--set", "n_steps=many"], r"Invalid n_steps: 'many' \(str\); expected an integer"),
    ("nan_policy", lambda f: [*TRAIN, "--set", "nan_policy=ignore"], r"Invalid nan_policy: 'ignore'; expected 'raise'"),
    ("policy_kwargs not a table", lambda f: [*TRAIN, "--set", "policy_kwargs=3"], r"Invalid policy_kwargs: 3 \(int\)"),
    ("net_arch 0", lambda f: [*TRAIN, "--set", "policy_kwargs.net_arch=[0]"], r"Invalid policy_kwargs.net_arch pi: \[0\]"),
    ("activation_fn code", lambda f: [*TRAIN, "--set", f"policy_kwargs.activation_fn=\"{CODE.format(marker=f['marker'])}\""],
     r"Invalid policy_kwargs.activation_fn: \"__import__"),
    ("--set without =", lambda f: [*TRAIN, "--set", "gamma"], r"Invalid --set 'gamma'; expected key=value"),
    ("n-envs 0", lambda f: [*TRAIN, "--n-envs", "0"], r"Invalid n_envs: 0; expected an integer >= 1"),
    ("steps 0", lambda f: ["train", "trpo", "CartPole-v1", "--steps", "0"], r"Invalid --steps: 0; expected >= 1"),
    ("steps text", lambda f: ["train", "trpo", "CartPole-v1", "--steps", "x"], r"argument --steps: invalid int value"),
    ("device", lambda f: [*TRAIN, "--device", "tpu"], r"Invalid device: 'tpu'"),
    ("threads 0", lambda f: [*TRAIN, "--threads", "0"], r"Invalid --threads: 0; expected >= 1"),
    ("run-dir under a file", lambda f: [*TRAIN, "--run-dir", str(f["good"] / "run")], r"Invalid run_dir: .*Not a directory"),
    ("resume missing dir", lambda f: ["train", "--resume", str(f["folder"] / "nothing")], r"Run directory not found"),
    ("resume corrupt checkpoint", lambda f: ["train", "--resume", _resume_dir(f, "truncated")],
     r"Cannot load checkpoint .*: the file is truncated or corrupt"),
    ("resume code checkpoint", lambda f: ["train", "--resume", _resume_dir(f, "evil")], r"refused, it refers to Python code"),
    ("resume unreadable config", lambda f: ["train", "--resume", _resume_dir(f, "good", config="algo = = 1")],
     r"Unreadable TOML in .*config.toml"),
    ("resume --set network shape", lambda f: ["train", "--resume", _resume_dir(f, "good"), "--set",
                                            "policy_kwargs.net_arch=[8]"],
     r"Invalid --set policy_kwargs on resume: policy_kwargs cannot change in a resumed run \(the checkpoint's networks"),
    ("resume --set n_envs", lambda f: ["train", "--resume", _resume_dir(f, "good"), "--set", "n_envs=4"],
     r"Invalid --set n_envs on resume: n_envs cannot change in a resumed run"),
    ("resume --set curvature", lambda f: ["train", "--resume", _resume_dir(f, "good"), "--set", "curvature=\"kfac\""],
     r"Invalid --set curvature on resume"),
    ("resume --set unknown key", lambda f: ["train", "--resume", _resume_dir(f, "good"), "--set", "gama=0.9"],
     r"Unknown hyperparameter 'gama' for trpo"),
    ("schedule name", lambda f: [*TRAIN, "--set", "learning_rate=cosine"],
     r"Invalid learning_rate: 'cosine'; expected a number, 'linear'"),
    ("schedule end", lambda f: [*TRAIN, "--set", "learning_rate=linear:-1"], r"Invalid learning_rate: the schedule ends at -1.0"),
    ("compare --set unknown name", lambda f: ["compare", "--out", str(f["folder"] / "cmp"), "--set", "tpro.target_kl=1"],
     r"hyperparameter 'tpro' is a field of none of trpo, acktr, ppo"),
    ("compare --set bad value", lambda f: ["compare", "--out", str(f["folder"] / "cmp"), "--set", "trpo.target_kl=0"],
     r"hyperparameters of trpo: Invalid target_kl: 0.0; expected > 0"),
    ("eval truncated checkpoint", lambda f: ["eval", _resume_dir(f, "truncated")], r"truncated or corrupt"),
    ("eval checkpoint of another program", lambda f: ["eval", _resume_dir(f, "foreign")], r"not a trpo_lab checkpoint"),
    ("eval 0 episodes", lambda f: ["eval", _resume_dir(f, "good"), "--episodes", "0"], r"Invalid --episodes: 0"),
    ("unknown command", lambda f: ["frobnicate"], r"invalid choice: 'frobnicate'"),
    ("eval video under a file", lambda f: ["eval", _resume_dir(f, "good"), "--video", str(f["good"] / "videos")],
     r"Invalid video folder: '.*good.pt/videos'; cannot create it"),
    ("tune bad storage", lambda f: ["tune", "ppo", "CartPole-v1", "--storage", "study"],
     r"Invalid --storage 'study'; expected an Optuna RDB URL \(sqlite:///study.db, .*\) or a journal file path"),
    ("tune unknown database", lambda f: ["tune", "ppo", "CartPole-v1", "--storage", "nosuchdb://x/y"],
     r"Invalid --storage 'nosuchdb://x/y': cannot open it \(NoSuchModuleError"),
    ("tune unreachable sqlite", lambda f: ["tune", "ppo", "CartPole-v1", "--storage", f"sqlite:///{f['good']}/x.db"],
     r"Invalid --storage 'sqlite:///.*good.pt/x.db': cannot open it \(OperationalError"),
    ("tune unknown space key", lambda f: ["tune", "trpo", "CartPole-v1", "--space", str(f["space_typo"])],
     r"Invalid search space .*: Unknown hyperparameter 'gama' for trpo; did you mean gamma"),
    ("tune unknown policy_kwargs key", lambda f: ["tune", "trpo", "CartPole-v1", "--space", str(f["space_policy_typo"])],
     r"unknown key 'policy_kwargs.net_arc' for trpo; expected one of \['policy_kwargs.net_arch'"),
    ("tune empty space", lambda f: ["tune", "ppo", "CartPole-v1", "--space", str(f["space_empty"])],
     r"Invalid search space .*space_empty.toml: it is empty"),
    ("tune reversed range", lambda f: ["tune", "ppo", "CartPole-v1", "--space", str(f["space_reversed"])],
     r"learning_rate: low = 0.01 is not below high = 1e-05"),
    ("tune range without bounds", lambda f: ["tune", "ppo", "CartPole-v1", "--space", str(f["space_no_bounds"])],
     r"learning_rate has unknown field\(s\) \['lo'\]; expected some of \['choices', 'low', 'high', 'log', 'step'\]"),
    ("tune missing space file", lambda f: ["tune", "ppo", "CartPole-v1", "--space", "none.toml"],
     r"TOML file not found: none.toml"),
    ("tune 0 trials", lambda f: ["tune", "ppo", "CartPole-v1", "--trials", "0"],
     r"Invalid --trials: 0; expected an integer >= 1"),
    ("tune 0 workers", lambda f: ["tune", "ppo", "CartPole-v1", "--workers", "0"], r"Invalid --workers: 0"),
    ("tune negative timeout", lambda f: ["tune", "ppo", "CartPole-v1", "--timeout", "-5"],
     r"Invalid --timeout: -5.0; expected a positive number of seconds"),
    ("tune bad --set", lambda f: ["tune", "ppo", "CartPole-v1", "--set", "gamma=2"], r"Invalid gamma: 2.0"),
    ("tune unknown env", lambda f: ["tune", "ppo", "CartPol-v1"], r"Unknown environment id 'CartPol-v1'"),
    ("export missing run dir", lambda f: ["export", str(f["folder"] / "nothing"), "--onnx", "p.onnx"],
     r"Run directory not found: .*nothing"),
    ("export folder without checkpoint", lambda f: ["export", str(f["folder"]), "--onnx", "p.onnx"],
     r"No final.pt or checkpoint.pt in .*; is it a run directory\?"),
    ("export without --onnx", lambda f: ["export", _resume_dir(f, "good")], r"the following arguments are required: --onnx"),
    ("export output under a file", lambda f: ["export", _resume_dir(f, "good"), "--onnx", str(f["good"] / "p.onnx")],
     r"Invalid ONNX output: '.*good.pt/p.onnx'; cannot write there"),
    ("export output is a folder", lambda f: ["export", _resume_dir(f, "good"), "--onnx", str(f["folder"])],
     r"Invalid ONNX output: '.*' is a folder; expected a file path such as policy.onnx"),
    ("export corrupt checkpoint", lambda f: ["export", _resume_dir(f, "truncated"), "--onnx", "p.onnx"],
     r"truncated or corrupt"),
    # resources and budgets (issue #18): refused before any environment or network is built
    ("net_arch beyond memory", lambda f: [*TRAIN, "--set", "policy_kwargs.net_arch=[100000,100000]"],
     r"Invalid policy_kwargs.net_arch: \[100000, 100000\]; this trpo with n_envs 8 .* needs an estimated"),
    ("--max-memory too small", lambda f: [*TRAIN, "--max-memory", "100KB"],
     r"Invalid n_steps: 8; this trpo .* more than the max_memory limit of 97.7 KiB"),
    ("--max-memory text", lambda f: [*TRAIN, "--max-memory", "lots"], r"Invalid max_memory: 'lots'"),
    ("n-envs above the budget", lambda f: [*TRAIN, "--n-envs", "100000"],
     r"Invalid n_envs: 100000; expected at most the 100 steps of the budget"),
    ("n-envs x nproc above the budget", lambda f: [*TRAIN, "--n-envs", "60", "--nproc", "2"],
     r"Invalid n_envs: 60 per process x 2 processes = 120 environments; expected at most the 100 steps"),
    ("compare n_envs above the budget", lambda f: ["compare", "--algos", "trpo", "--envs", "CartPole-v1", "--seeds", "1",
                                                   "--steps", "4", "--quiet"],
     r"CartPole-v1.*: Invalid n_envs: \d+; expected at most the 4 steps of the budget"),
    ("compare peer on an env without zoo settings", lambda f: ["compare", "--algos", "sb3-trpo", "--envs", "CartPole-v1",
                                                                "--out", str(f["folder"] / "cmp"), "--quiet"],
     r"Invalid env for sb3-trpo: 'CartPole-v1' has no rl-baselines3-zoo settings here; expected one of HalfCheetah-v5"),
    ("compare unknown algorithm", lambda f: ["compare", "--algos", "sb3-npg", "--out", str(f["folder"] / "cmp")],
     r"Unknown algorithm 'sb3-npg' in algos; expected one of .*a peer \(sb3-trpo, sb3-ppo\)"),
    ("--max-memory with --resume", lambda f: ["train", "--resume", _resume_dir(f, "good"), "--max-memory", "1GB"],
     r"--max-memory applies to new runs"),
    ("resume config.toml unknown key", lambda f: ["train", "--resume", _resume_dir(f, "good", config=_config_with("colour = 1"))],
     r"Invalid .*config.toml: unknown key 'colour'; expected some of"),
    ("resume config.toml unknown hyperparameter",
     lambda f: ["train", "--resume", _resume_dir(f, "good", config=_config_with("[hyperparameters]\ngama = 0.9"))],
     r"Invalid .*config.toml: Unknown hyperparameter 'gama' for trpo; did you mean gamma"),
    ("resume config.toml bad budget", lambda f: ["train", "--resume", _resume_dir(f, "good", config='total_timesteps = "x"\n')],
     r"Invalid total_timesteps in .*config.toml: 'x'; expected an integer >= 1"),
]


def _config_with(extra: str) -> str:
    """A run's config.toml, edited by hand."""
    return f'algo = "trpo"\ntotal_timesteps = 100\n{extra}\n'



@pytest.mark.parametrize(("argv", "message"), [pytest.param(a, m, id=i) for i, a, m in CLI_CASES])
def test_cli_exits_2_with_one_line(
    files: dict[str, Path], argv: Callable[[dict[str, Path]], list[str]], message: str,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    from trpo_lab.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(argv(files))  # an exception escaping main would be a traceback for the user
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith("trpo-lab"), err[0]
    assert re.search(message, err[0]), err[0]
    assert not files["marker"].exists(), "a crafted input ran code"


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (lambda f: ["train", "trpo", "CartPole-v1", "--steps", "50"], "presets_code", r"Invalid preset .*activation_fn"),
        (lambda f: ["train", "trpo", "CartPole-v1"], "presets_syntax", r"Unreadable TOML in"),
        (lambda f: ["eval", _resume_dir(f, "evil")], None, r"refused, it refers to Python code"),
        (lambda f: ["train", "trpo", "CartPole-v1", "--set", "policy_kwargs.net_arch=[100000,100000]", "--steps", "100"],
         None, r"^trpo-lab: error: Invalid policy_kwargs.net_arch: \[100000, 100000\]; .* needs an estimated 322.5 GiB"),
    ],
    ids=["preset with code", "preset syntax", "checkpoint with code", "networks beyond memory (issue 18)"],
)
def test_cli_as_a_process_prints_no_traceback(
    files: dict[str, Path], argv: Callable[[dict[str, Path]], list[str]], env: str | None, message: str, tmp_path: Path
) -> None:
    environ = dict(os.environ)
    if env is not None:
        environ["TRPO_LAB_PRESETS"] = str(files[env])
    result = subprocess.run([sys.executable, "-m", "trpo_lab", *argv(files)], cwd=tmp_path, env=environ,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not files["marker"].exists()
