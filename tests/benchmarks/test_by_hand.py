"""benchmarks/by_hand.py: every piece times both paths (PPO's also compiled; the hand-written
path is restored after), and the SB3 comparison runs only where our preset's sizes are rl-zoo's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from trpo_lab import PPO
from trpo_lab.nn.policy import ActorCritic

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "by_hand.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("by_hand_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_piece_times_both_paths_and_leaves_the_hand_written_one_in_place(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    module = _load()
    original = ActorCritic.dist_params_and_value_by_hand
    monkeypatch.setattr(sys, "argv", ["by_hand.py", "--envs", "CartPole-v1", "--repeats", "1", "--sb3"])
    module.main()
    lines = capsys.readouterr().out.splitlines()
    assert len([line for line in lines if "autograd / by hand" in line]) == 3, lines
    assert any("PPO update (" in line and "compiled / by hand" in line for line in lines)
    assert any("CartPole-v1: SB3 skipped, no rl-zoo PPO settings here" in line for line in lines)
    assert ActorCritic.dist_params_and_value_by_hand is original


def test_sb3_is_timed_only_where_the_preset_has_rl_zoos_sizes() -> None:
    pytest.importorskip("mujoco")
    module = _load()
    assert module.sb3_differs(PPO.from_preset("HalfCheetah-v5", seed=0), "HalfCheetah-v5") == ""
    assert "n_steps 2048 here, 512 in rl-zoo's table" in module.sb3_differs(PPO.from_preset("Hopper-v5", seed=0), "Hopper-v5")
