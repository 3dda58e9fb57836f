"""Schedules of learning_rate, ent_coef and clip_range: forms, validation, the loop, resume."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from trpo_lab import ACKTR, PPO, TRPO
from trpo_lab.agents.base import OnPolicyAgent
from trpo_lab.cli import main as cli_main
from trpo_lab.config import ACKTRConfig, PPOConfig, TRPOConfig, merge_hyperparameters
from trpo_lab.schedules import Schedule, parse_schedule, progress_remaining, with_initial

SMALL: dict[str, Any] = {"n_envs": 2, "seed": 0, "n_steps": 16}


# ---------------------------------------------------------------------- forms


def test_string_forms_and_their_values() -> None:
    assert parse_schedule("lr", 3e-4, initial=1.0) == 3e-4
    linear = parse_schedule("lr", "linear", initial=0.5)
    assert linear == Schedule(initial=0.5, final=0.0)
    assert parse_schedule("lr", "linear:0.1", initial=0.5) == Schedule(initial=0.5, final=0.1)
    assert parse_schedule("lr", " linear : 2 : 1 ", initial=0.5) == Schedule(initial=2.0, final=1.0)
    # value(p) = final + (initial - final) p, p clipped to [0, 1]
    schedule = Schedule(initial=2.0, final=1.0)
    assert [schedule(p) for p in (1.0, 0.75, 0.0, -1.0, 2.0)] == [2.0, 1.75, 1.0, 1.0, 2.0]


def test_callable_schedule_follows_sb3_convention() -> None:
    cfg = PPOConfig(learning_rate=lambda p: 1e-3 * p, clip_range=lambda p: 0.1 + 0.1 * p)
    assert isinstance(cfg.learning_rate, Schedule) and cfg.learning_rate.is_callable
    assert (cfg.learning_rate.initial, cfg.learning_rate.final) == (1e-3, 0.0)
    values = cfg.scheduled_values(0.5)
    assert values == {"learning_rate": 5e-4, "ent_coef": 0.0, "clip_range": pytest.approx(0.15)}


def test_progress_remaining() -> None:
    assert progress_remaining(0, 100) == 1.0
    assert progress_remaining(25, 100) == 0.75
    assert progress_remaining(130, 100) == 0.0


def test_linear_without_initial_starts_from_the_value_it_replaces() -> None:
    assert with_initial("linear", 1e-3) == "linear:0.001:0.0"
    assert with_initial("linear:1e-5", 1e-3) == "linear:0.001:1e-5"
    assert with_initial("linear:1:2", 1e-3) == "linear:1:2"
    assert with_initial(0.5, 1e-3) == 0.5
    # over a schedule, "linear" starts where that schedule starts (its string form or the object)
    assert with_initial("linear", "linear:3e-4:1e-3") == "linear:0.0003:0.0"
    assert with_initial("linear:1e-5", Schedule(initial=2e-3, final=0.0)) == "linear:0.002:1e-5"
    assert with_initial("linear", "linear:1e-3") == "linear"  # its start is unknown here: the config's default then
    assert with_initial("linear", "cosine") == "linear"
    merged = merge_hyperparameters({"learning_rate": 1e-3, "policy_kwargs": {"net_arch": [8]}},
                                   {"learning_rate": "linear", "policy_kwargs": {"ortho_init": False}})
    assert merged == {"learning_rate": "linear:0.001:0.0", "policy_kwargs": {"net_arch": [8], "ortho_init": False}}
    # without a number below it, "linear" starts at the config's default
    assert PPOConfig(learning_rate="linear").learning_rate == Schedule(initial=3e-4, final=0.0)
    assert TRPOConfig(learning_rate="linear").learning_rate == Schedule(initial=1e-3, final=0.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"learning_rate": "cosine"}, r"Invalid learning_rate: 'cosine'; expected a number, 'linear', 'linear:<final>'"),
        ({"clip_range": "linear:x"}, r"Invalid clip_range: 'linear:x'; 'x' is not a number"),
        ({"clip_range": "linear:1:2:3"}, r"Invalid clip_range: 'linear:1:2:3'; expected a number, 'linear'"),
        ({"clip_range": "linear:inf"}, r"Invalid clip_range: 'linear:inf'; 'inf' is not finite"),
        ({"learning_rate": "linear:-1e-3"}, r"Invalid learning_rate: the schedule ends at -0.001; expected > 0 or 0"),
        ({"learning_rate": "linear:0:1"}, r"Invalid learning_rate: the schedule starts at 0.0; expected > 0"),
        ({"ent_coef": -0.1}, r"Invalid ent_coef: -0.1; expected >= 0"),
        ({"ent_coef": [0.1]}, r"Invalid ent_coef: \[0.1\] \(list\); expected a number"),
        ({"learning_rate": float("nan")}, r"Invalid learning_rate: nan; expected a finite number or a schedule"),
        ({"learning_rate": lambda p: "fast"}, r"Invalid learning_rate: the callable schedule returned 'fast'"),
        ({"learning_rate": lambda p: 1 / p}, r"Invalid learning_rate: the callable schedule failed at progress_remaining=0.0"),
    ],
)
def test_bad_schedules_are_named(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PPOConfig(**kwargs)


def test_a_callable_that_leaves_the_range_midway_is_named() -> None:
    cfg = PPOConfig(clip_range=lambda p: 0.2 if p in (0.0, 1.0) else -1.0)
    with pytest.raises(ValueError, match=r"Invalid clip_range: the schedule gave -1.0 at progress_remaining=0.5"):
        cfg.scheduled_values(0.5)


def test_toml_holds_the_full_string_form_and_refuses_callables(tmp_path: Path) -> None:
    cfg = PPOConfig(learning_rate="linear:1e-5", clip_range=0.1)
    assert cfg.to_dict()["learning_rate"] == "linear:0.0003:1e-05"
    assert PPOConfig.from_dict(cfg.to_dict()) == cfg
    agent = PPO("CartPole-v1", **SMALL, ent_coef=lambda p: 0.01 * p)
    try:
        with pytest.raises(ValueError, match=r"Cannot save ent_coef: it is a callable schedule \(<lambda>\)"):
            agent.save(tmp_path / "agent.pt")
        with pytest.raises(ValueError, match="Cannot save ent_coef"):
            agent.learn(32, run_dir=tmp_path / "run")
        assert not (tmp_path / "run" / "progress.csv").exists()
        agent.learn(32)  # without files a callable is fine
    finally:
        agent.close()


# ---------------------------------------------------------------------- the loop


SCHEDULED: list[tuple[type[OnPolicyAgent], dict[str, Any], dict[str, float]]] = [
    (PPO, {"learning_rate": "linear:1e-3:1e-5", "clip_range": "linear:0.3:0.1", "ent_coef": "linear:0.02:0"},
     {"learning_rate": 1e-5, "clip_range": 0.1, "ent_coef": 0.0}),
    (ACKTR, {"learning_rate": "linear:0.2:0.01", "ent_coef": "linear:0:0.01"}, {"learning_rate": 0.01, "ent_coef": 0.01}),
    (TRPO, {"learning_rate": "linear", "ent_coef": lambda p: 0.01 * p * p}, {"learning_rate": 0.0, "ent_coef": 0.0}),
]


@pytest.mark.parametrize(("cls", "schedules", "final"), SCHEDULED, ids=lambda v: getattr(v, "__name__", ""))
def test_schedules_end_at_their_final_value(
    cls: type[OnPolicyAgent], schedules: dict[str, Any], final: dict[str, float]
) -> None:
    agent = cls("CartPole-v1", **SMALL, **schedules)
    seen: list[dict[str, float]] = []
    agent.learn(200, callback=lambda a, m: seen.append(dict(m)) or None)
    agent.close()
    config = agent.config
    for name, value in final.items():
        logged = [m[f"train/{name}"] for m in seen]
        # each update uses the value after its rollout: progress = 1 - timesteps / total
        expected = [config.scheduled_values(progress_remaining(int(m["time/timesteps"]), 200))[name] for m in seen]
        assert logged == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert logged[0] != value and logged[-1] == pytest.approx(value, abs=1e-15)
        assert agent.current_values[name] == pytest.approx(value, abs=1e-15)
    for optimizer in agent._learning_rate_optimizers():
        assert all(group["lr"] == pytest.approx(final["learning_rate"], abs=1e-15) for group in optimizer.param_groups)


@pytest.mark.parametrize(("cls", "schedules", "final"), SCHEDULED[:2], ids=lambda v: getattr(v, "__name__", ""))
def test_an_interrupted_and_resumed_run_follows_the_schedule_exactly(
    cls: type[OnPolicyAgent], schedules: dict[str, Any], final: dict[str, float], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    straight = cls("CartPole-v1", **SMALL, **schedules)
    straight_seen: list[dict[str, float]] = []
    straight.learn(240, callback=lambda a, m: straight_seen.append(dict(m)) or None)
    straight.close()

    first = cls("CartPole-v1", **SMALL, **schedules)
    first.learn(240, callback=lambda a, m: a.num_updates < 3)  # stops after 3 updates
    first.save(tmp_path / "agent.pt")
    first.close()
    resumed = cls.load(tmp_path / "agent.pt")
    assert resumed.schedule_total_timesteps == 240
    assert resumed.current_values == first.current_values  # the checkpoint restores the schedule's state
    resumed_seen: list[dict[str, float]] = []
    resumed.learn(240, callback=lambda a, m: resumed_seen.append(dict(m)) or None)
    resumed.close()

    assert resumed.num_timesteps == straight.num_timesteps
    assert resumed.current_values == straight.current_values
    for name in final:
        assert [m[f"train/{name}"] for m in resumed_seen] == [m[f"train/{name}"] for m in straight_seen[3:]]
    for (key, a), b in zip(straight.policy.state_dict().items(), resumed.policy.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_callable_schedule_cannot_be_checkpointed_but_trains() -> None:
    agent = PPO("CartPole-v1", **SMALL, learning_rate=lambda p: 1e-3 * max(p, 0.1))
    seen: list[float] = []
    agent.learn(96, callback=lambda a, m: seen.append(m["train/learning_rate"]) or None)
    agent.close()
    assert seen[-1] == pytest.approx(1e-4) and seen[0] > seen[-1]
    assert agent.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_retired_lr_schedule_in_an_old_checkpoint_loads(tmp_path: Path) -> None:
    agent = ACKTR("CartPole-v1", **SMALL, learning_rate=0.2)
    data = agent.state_dict()
    agent.close()
    data["config"] = {**data["config"], "lr_schedule": "linear"}
    data["counters"].pop("schedule_total_timesteps")  # as written before schedules were checkpointed
    torch.save(data, tmp_path / "old.pt")
    with pytest.warns(FutureWarning, match="lr_schedule"):
        loaded = ACKTR.load(tmp_path / "old.pt")
    assert loaded.config.learning_rate == Schedule(initial=0.2, final=0.0)
    assert loaded.schedule_total_timesteps is None and loaded.current_values["learning_rate"] == 0.2
    loaded.close()
    assert ACKTRConfig.from_dict({"learning_rate": 0.2}).learning_rate == 0.2


def test_cli_set_schedule_on_a_preset(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["train", "ppo", "Pendulum-v1", "--steps", "512", "--n-envs", "2", "--run-dir", str(run_dir), "--quiet",
            "--set", "learning_rate=linear:1e-5", "--set", "clip_range=linear", "--set", "n_steps=64"]
    assert cli_main(args) == 0
    text = (run_dir / "config.toml").read_text()
    # the preset's learning_rate (1e-3 for Pendulum-v1) is where the decay starts
    assert 'learning_rate = "linear:0.001:1e-05"' in text and 'clip_range = "linear:0.2:0.0"' in text
    loaded = PPO.load(run_dir / "final.pt")
    assert loaded.current_values["learning_rate"] == pytest.approx(1e-5)
    assert math.isclose(loaded.optimizer.param_groups[0]["lr"], 1e-5)
    loaded.close()
