"""benchmarks/throughput.py's peers: ``--peers`` and its bad inputs, the skip of a peer without a
counterpart, and a tiny training run per installed peer (Tianshou and skrl come with the
``bench`` extra; without it their runs skip and the rest still runs)."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import gymnasium as gym
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
FAST = ["--n-envs", "2", "--steps", "256", "--warmup", "128", "--repeats", "1"]


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    # Registered under its own name while loaded: dataclasses resolve the module's annotations through sys.modules.
    spec = importlib.util.spec_from_file_location("throughput_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def _fake_peer(bench: ModuleType, algorithms: dict[str, str]) -> Any:
    """A peer that takes no time: its runner reports the steps asked for."""
    return bench.Peer(label="fake", packages=(), algorithms=algorithms, build=lambda *_: lambda steps: steps)


# ---------------------------------------------------------------------------------- --peers
def test_peers_parse_to_the_canonical_order_without_duplicates(bench: ModuleType) -> None:
    assert bench.parse_peers("sb3") == ["sb3"]
    assert bench.parse_peers("skrl, SB3,tianshou,skrl") == ["sb3", "tianshou", "skrl"]


@pytest.mark.parametrize(("value", "named"), [("sb3,rllib", "'rllib'"), ("", "''"), (",", "','")])
def test_an_unknown_or_empty_peer_exits_2_with_one_line(
    bench: ModuleType, capsys: pytest.CaptureFixture[str], value: str, named: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--peers", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --peers: invalid peer(s) {named}; expected a comma-separated subset of sb3,tianshou,skrl" in err
    assert "Traceback" not in err


def test_a_missing_package_names_the_bench_extra(
    bench: ModuleType, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    absent = dataclasses.replace(bench.PEERS["tianshou"], packages=("tianshou_is_not_installed_here",))
    monkeypatch.setitem(bench.PEERS, "tianshou", absent)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--peers", "sb3,tianshou"])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith(
        "error: peer 'tianshou' needs the tianshou_is_not_installed_here package, which is not installed: "
        'pip install "trpo-lab[bench]"'
    )


# ---------------------------------------------------------------------------------- skipping
def test_skip_reasons(bench: ModuleType) -> None:
    discrete, box = gym.spaces.Discrete(2), gym.spaces.Box(-1.0, 1.0, (1,))
    assert bench.PEERS["sb3"].skip_reason("npg", discrete) == "sb3 has no counterpart for npg; skipped"
    assert bench.PEERS["skrl"].skip_reason("npg", box) == "skrl has no counterpart for npg; skipped"
    assert bench.PEERS["skrl"].skip_reason("trpo", discrete) == (
        "skrl TRPO supports Box (Gaussian) actions only, not Discrete; skipped"
    )
    assert bench.PEERS["skrl"].skip_reason("trpo", box) is None
    for name in ("sb3", "tianshou", "skrl"):
        assert bench.PEERS[name].skip_reason("ppo", discrete) is None


def test_a_peer_without_a_counterpart_is_skipped_and_the_others_run(
    bench: ModuleType, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(bench.PEERS, "fake", _fake_peer(bench, {"npg": "Fake NPG"}))
    assert bench.main(["--algo", "npg", "--peers", "sb3,fake", *FAST]) == 0
    out = capsys.readouterr().out
    assert out.startswith("note: sb3 has no counterpart for npg; skipped\n")
    assert "npg vs Fake NPG on CartPole-v1: n_envs=2" in out
    assert re.search(r"^  trpo_lab  median +\d+ steps/s", out, re.MULTILINE)
    assert re.search(r"^  ratio trpo_lab / fake = \d+\.\d\dx$", out, re.MULTILINE)
    assert "ratio trpo_lab / sb3" not in out


def test_no_peer_left_exits_2(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--algo", "npg", "--peers", "sb3"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "note: sb3 has no counterpart for npg; skipped" in captured.out
    assert "error: no chosen peer (sb3) has a counterpart for npg on CartPole-v1" in captured.err


# ---------------------------------------------------------------------------------- tiny training runs
def _spy_updates(monkeypatch: pytest.MonkeyPatch, cls: type, moved: list[bool]) -> None:
    """Record, for each call of ``cls.update``, whether it changed the policy's parameters."""
    original = cls.update  # type: ignore[attr-defined]

    def update(self: Any, *args: Any, **kwargs: Any) -> Any:
        before = [p.detach().clone() for p in self.policy.parameters()]
        result = original(self, *args, **kwargs)
        moved.append(any(not torch.equal(b, p) for b, p in zip(before, self.policy.parameters())))
        return result

    monkeypatch.setattr(cls, "update", update)


def _update_class(peer: str, algo: str) -> Any:
    if peer == "tianshou":
        from tianshou.algorithm.algorithm_base import OnPolicyAlgorithm

        return OnPolicyAlgorithm
    from skrl.agents.torch.ppo import PPO
    from skrl.agents.torch.trpo import TRPO

    return PPO if algo == "ppo" else TRPO


@pytest.mark.parametrize(
    ("peer", "algo", "env_id"),
    [
        ("tianshou", "trpo", "CartPole-v1"),
        ("tianshou", "npg", "CartPole-v1"),
        ("tianshou", "ppo", "Pendulum-v1"),
        ("skrl", "ppo", "CartPole-v1"),
        ("skrl", "trpo", "Pendulum-v1"),
    ],
)
def test_a_peer_trains_and_reports_a_positive_rate(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch, peer: str, algo: str, env_id: str
) -> None:
    pytest.importorskip(peer)
    moved: list[bool] = []
    _spy_updates(monkeypatch, _update_class(peer, algo), moved)
    settings = {**bench.SETTINGS[algo], "n_steps": 64, "batch_size": 64}
    run = bench.PEERS[peer].build(algo, env_id, 2, settings)
    assert run(256) == 256  # two whole rollouts of 64 steps x 2 envs
    assert moved == [True, True]  # one update per rollout, and each one changed the policy
    assert bench.timed(run, 128) > 0


def test_every_installed_peer_in_one_interleaved_run(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tianshou")
    pytest.importorskip("skrl")
    assert bench.main(["--algo", "ppo", "--peers", "sb3,tianshou,skrl", *FAST]) == 0
    out = capsys.readouterr().out
    assert "ppo vs SB3 PPO, Tianshou PPO, skrl PPO on CartPole-v1: n_envs=2" in out
    for name in ("trpo_lab", "sb3", "tianshou", "skrl"):
        match = re.search(rf"^  {name} +median +(\d+) steps/s", out, re.MULTILINE)
        assert match is not None and int(match.group(1)) > 0, out
    for name in ("sb3", "tianshou", "skrl"):
        assert re.search(rf"^  ratio trpo_lab / {name} = \d+\.\d\dx$", out, re.MULTILINE), out
