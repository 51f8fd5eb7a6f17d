"""Every ```python block of README.md and docs/*.md runs as written (blocks not meant to run are ```bash or
```text). Blocks that import diffusers run where it is installed (the test extra installs it)."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks():
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.S | re.M):
            line = text.count("\n", 0, match.start()) + 1
            yield pytest.param(match.group(1), id=f"{doc.relative_to(ROOT)}:{line}")


BLOCKS = list(python_blocks())


def test_the_readme_has_blocks_to_run():
    readme = [b for b in BLOCKS if b.id.startswith("README.md")]
    assert len(readme) >= 4  # the quick start, training code, diffusers, GroupNorm + SiLU


@pytest.mark.parametrize("code", BLOCKS)
def test_block_runs(code, tmp_path, monkeypatch):
    if re.search(r"^\s*(import diffusers|from diffusers)", code, flags=re.M) and not importlib.util.find_spec(
            "diffusers"):
        pytest.skip("needs diffusers (pip install -e '.[test]')")
    monkeypatch.chdir(tmp_path)  # files the block writes land here
    monkeypatch.setenv("FASTDDPM_NO_PROGRESS", "1")
    exec(compile(code, "<block>", "exec"), {"__name__": "__readme__"})
