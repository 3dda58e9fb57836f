"""benchmarks/acktr_overhead.py on CartPole-v1 (its MLP preset, seconds): both timing methods
run and report a ratio, the fresh-rollout method trains the K-FAC agent along its own run,
and a bad option is refused with a one-line usage error."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "acktr_overhead.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("acktr_overhead_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    monkeypatch.setattr(sys, "argv", ["acktr_overhead.py", "--env", "CartPole-v1", "--blocks", "1", *args])
    _load().main()
    return capsys.readouterr().out


@pytest.mark.parametrize("method", [[], ["--fixed-batch"]], ids=["fresh_rollouts", "fixed_batch"])
def test_both_methods_report_a_ratio(
    method: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _run(monkeypatch, capsys, *method)
    assert ("cycles on fresh rollouts" in out) is (not method)
    ratio = re.search(r"ratio kfac / first_order = ([0-9.]+)x", out)
    assert ratio is not None and float(ratio.group(1)) > 0.0


def test_train_updates_move_the_kfac_agent_along_its_run_before_timing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _run(monkeypatch, capsys, "--train-updates", "7", "--spectrum", "1e-3")
    assert "after 7 training updates" in out
    # 7 training updates, then the warm-up cycle and one timed cycle of 10 updates each
    assert re.search(r"keeps, after 27 updates", out), out


def test_negative_train_updates_are_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _run(monkeypatch, capsys, "--train-updates", "-3")
    assert exit_info.value.code == 2
    assert "--train-updates must be >= 0, got -3" in capsys.readouterr().err
