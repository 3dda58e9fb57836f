"""benchmarks/atari.py's pairing logic: both sides interleaved per seed, or one side only
(``--side``), with the runners replaced by stubs (no emulator needed)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "atari.py"


def _load(monkeypatch: pytest.MonkeyPatch, calls: list[tuple[str, str, int]]) -> ModuleType:
    spec = importlib.util.spec_from_file_location("atari_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def fake(side: str, rate: float) -> Any:
        def run(algo: str, env_id: str, seed: int, steps: int, *_: Any) -> dict[str, Any]:
            calls.append((side, algo, seed))
            return {"steps": steps, "wall_s": steps / rate, "curve": [(4.0 * steps, -20.0)], "n_envs": 8}

        return run

    monkeypatch.setattr(module, "run_ours", fake("ours", 300.0))
    monkeypatch.setattr(module, "run_theirs", fake("peer", 200.0))
    return module


def _main(module: ModuleType, monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["atari.py", "--frames", "4000", "--algos", "ppo", *args])
    module.main()


def test_both_sides_interleave_per_seed_and_report_the_ratio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str, int]] = []
    out = tmp_path / "both.json"
    _main(_load(monkeypatch, calls), monkeypatch, "--seeds", "2", "--out", str(out))
    assert calls == [("ours", "ppo", 0), ("peer", "ppo", 0), ("ours", "ppo", 1), ("peer", "ppo", 1)]
    payload = json.loads(out.read_text())
    assert payload["side"] == "both" and sorted(payload["runs"]) == ["ours/ppo", "sb3/ppo"]
    assert payload["steps_per_s_ratio"] == {"ppo": pytest.approx(1.5)}


@pytest.mark.parametrize(("side", "key"), [("ours", "ours/ppo"), ("peer", "sb3/ppo")])
def test_one_side_runs_alone_without_a_ratio(
    side: str, key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[str, str, int]] = []
    out = tmp_path / f"{side}.json"
    _main(_load(monkeypatch, calls), monkeypatch, "--side", side, "--first-seed", "3", "--out", str(out))
    assert calls == [(side, "ppo", 3)]
    payload = json.loads(out.read_text())
    assert payload["side"] == side and list(payload["runs"]) == [key] and payload["seeds"] == [3]
    assert payload["steps_per_s_ratio"] == {}
    assert "ratio" not in capsys.readouterr().out


def test_unknown_side_is_refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    module = _load(monkeypatch, [])
    with pytest.raises(SystemExit) as excinfo:
        _main(module, monkeypatch, "--side", "theirs")
    assert excinfo.value.code == 2
    assert "invalid choice: 'theirs'" in capsys.readouterr().err
