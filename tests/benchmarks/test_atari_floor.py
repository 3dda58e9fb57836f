"""benchmarks/atari_floor.py: the floor and the ratios it reports, from stubbed measurements
(no SB3 run needed), its bad options, and the emulator timing on a real Pong vector env."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "atari_floor.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("atari_floor_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Side:
    """A stand-in agent: fixed FLOPs and fixed (rollout, update) seconds per iteration."""

    def __init__(self, flops: int, split: tuple[float, float]) -> None:
        self._flops, self._split, self.calls = flops, split, 0

    def iterations(self, updates: int) -> list[tuple[float, float]]:
        self.calls += 1
        return [self._split] * updates

    def flops(self) -> int:
        return self._flops


def test_the_floor_is_the_emulator_plus_the_flops_at_the_peak_rate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    module = _load()
    ours, theirs = _Side(200 * 10**9, (1.0, 3.0)), _Side(190 * 10**9, (1.5, 4.5))
    monkeypatch.setattr(module, "Ours", lambda seed: ours)
    monkeypatch.setattr(module, "Theirs", lambda seed: theirs)
    monkeypatch.setattr(module, "peak_gflops", lambda: 100.0)
    monkeypatch.setattr(module, "emulator_seconds", lambda n_envs, n_steps, seed: 0.5)
    out = tmp_path / "floor.json"
    monkeypatch.setattr(sys, "argv", ["atari_floor.py", "--updates", "2", "--repeats", "3", "--out", str(out)])
    module.main()
    result = json.loads(out.read_text())
    assert ours.calls == theirs.calls == 3  # interleaved repeats, both sides each time
    assert result["floor_s"] == pytest.approx(0.5 + 200 / 100.0)
    assert result["ours"]["iteration_s"] == pytest.approx(4.0) and result["sb3"]["iteration_s"] == pytest.approx(6.0)
    assert result["measured_ratio"] == pytest.approx(1.5)
    assert result["max_ratio_at_floor"] == pytest.approx(6.0 / 2.5)
    assert len(result["splits"]["ours"]) == 6
    assert "largest ratio the floor allows: 2.40x" in capsys.readouterr().out


@pytest.mark.parametrize("option", [["--updates", "0"], ["--repeats", "-1"]])
def test_bad_counts_are_refused(
    option: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["atari_floor.py", *option])
    with pytest.raises(SystemExit) as exit_info:
        _load().main()
    assert exit_info.value.code == 2
    assert "expected >= 1" in capsys.readouterr().err


def test_peak_rate_is_measured() -> None:
    assert _load().peak_gflops(sizes=(64,), repeats=2) > 0.0


def test_emulator_seconds_steps_the_atari_vector_env() -> None:
    pytest.importorskip("ale_py")
    assert _load().emulator_seconds(2, 5, seed=0) > 0.0
