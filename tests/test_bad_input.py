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

from trpo_lab.agents import agent_class
from trpo_lab.agents.base import OnPolicyAgent
from trpo_lab.agents.trpo import TRPO
from trpo_lab.config import ACKTRConfig, PPOConfig, TRPOConfig, config_class, load_toml, parse_set_option
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
    ("n_steps beyond memory", trpo(n_steps=10**13), r"Invalid n_steps: 10000000000000; a rollout buffer of n_steps x "
                                                    r"n_envs = 10000000000000 x 1 does not fit in memory"),
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
    ("Dict observations", trpo(env=spaces(gym.spaces.Dict({"a": BOX}), gym.spaces.Discrete(2))),
     r"Unsupported observation space Dict\('a': Box.*; supported: Box and Discrete"),
    ("Tuple observations", trpo(env=spaces(gym.spaces.Tuple((BOX,)), gym.spaces.Discrete(2))),
     r"Unsupported observation space Tuple\(Box.*; supported: Box and Discrete"),
    ("Text observations", trpo(env=spaces(gym.spaces.Text(5), gym.spaces.Discrete(2))),
     r"Unsupported observation space Text\(1, 5.*; supported: Box and Discrete"),
    ("MultiBinary observations", trpo(env=spaces(gym.spaces.MultiBinary(3), gym.spaces.Discrete(2))),
     r"Unsupported observation space MultiBinary\(3\); supported: Box and Discrete"),
    ("Discrete observations from 1", trpo(env=spaces(gym.spaces.Discrete(3, start=1), gym.spaces.Discrete(2))),
     r"Unsupported observation space Discrete\(3, start=1\): start=1; supported: Discrete / MultiDiscrete starting at 0"),
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


TRAIN = ["train", "trpo", "CartPole-v1", "--steps", "100"]
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
    ("eval truncated checkpoint", lambda f: ["eval", _resume_dir(f, "truncated")], r"truncated or corrupt"),
    ("eval checkpoint of another program", lambda f: ["eval", _resume_dir(f, "foreign")], r"not a trpo_lab checkpoint"),
    ("eval 0 episodes", lambda f: ["eval", _resume_dir(f, "good"), "--episodes", "0"], r"Invalid --episodes: 0"),
    ("unknown command", lambda f: ["frobnicate"], r"invalid choice: 'frobnicate'"),
]


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
    ],
    ids=["preset with code", "preset syntax", "checkpoint with code"],
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
