"""The code blocks of docs/sb3.md (the README's "Use from Stable-Baselines3" section) run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "sb3.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)


def test_the_page_has_its_four_examples() -> None:
    assert len(BLOCKS) == 4


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_code_block_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"sb3_doc_block_{index}"}
    exec(compile(BLOCKS[index], f"{DOC}:block{index}", "exec"), namespace)
    if index == 0:
        assert (tmp_path / "trpo_cartpole.zip").is_file()
        assert any((tmp_path / "checkpoints").iterdir())
        assert any((tmp_path / "tb").rglob("events.out.tfevents.*"))
    if index == 3:
        assert (tmp_path / "vecnormalize.pkl").is_file()
