"""README's code that a user would paste: the Stable-Baselines3 snippet runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _section_blocks(heading: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else None]
    return re.findall(r"^```python\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE)


@pytest.mark.slow
def test_sb3_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (block,) = _section_blocks("Use from Stable-Baselines3")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme_sb3"}
    exec(compile(block, f"{README}:sb3", "exec"), namespace)
    assert float(namespace["mean_return"]) > 0  # type: ignore[arg-type]


def test_quick_start_commands_match_ci() -> None:
    text = README.read_text(encoding="utf-8")
    commands = re.findall(r"^```bash\n(.*?)\n```", text[: text.index("## Command line")], flags=re.DOTALL | re.MULTILINE)
    assert commands[0] == "pip install . && trpo-lab compare"
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[1] in ci, "the README's test command is the one .ci/run runs"


def test_ci_installs_what_a_newcomer_gets_and_runs_the_checks() -> None:
    """No pin of our own in CI (it would test another torch than a user gets); lint and types run."""
    lines = [
        line.strip()
        for line in (README.parent / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    installs = [line for line in lines if "pip install" in line]
    assert installs == ['pip install -e ".[dev,mujoco]" && python -m pytest'], installs
    assert not [line for line in lines if re.search(r"==\d", line)], "a version pin in .ci/run"
    assert any(line.startswith("python -m ruff check trpo_lab tests benchmarks") for line in lines)
    assert any(line.startswith("python -m mypy") for line in lines)
