"""benchmarks/gpu_update.py runs in CI: it skips cleanly without CUDA, and its CPU half runs at a tiny size."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_update.py"


def _load() -> ModuleType:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("gpu_update_benchmark", SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPT.parent))


def test_skips_cleanly_without_cuda(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _load().main([]) == 0
    assert "CUDA is not available on this machine; the GPU benchmark is skipped" in capsys.readouterr().out


def test_tiny_cpu_half_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results.jsonl"
    assert _load().main(["--tiny", "--loop-updates", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cpu, 1 thread, host path" in printed and "env-steps/s" in printed
    record = json.loads(out.read_text())
    assert record["cpu_1thread_update_s"] > 0 and record["cpu_loop_steps_per_s"] > 0
