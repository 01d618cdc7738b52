"""The README's and every docs/ page's Python blocks run, each page's in order in one namespace: the
documentation cannot rot."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(page: Path) -> list:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def test_readme_has_usage_blocks():
    assert len(python_blocks(ROOT / "README.md")) >= 4


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for i, block in enumerate(python_blocks(page)):
        exec(compile(block.replace("/tmp/", f"{tmp_path}/"), f"{page.name} block {i}", "exec"), namespace)


def test_every_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert all(f"docs/{page.name}" in readme for page in PAGES[1:])


def test_every_page_the_readme_links_exists():
    readme = (ROOT / "README.md").read_text()
    linked = set(re.findall(r"\]\(((?:docs|examples)/[^)#]+)", readme))
    assert linked and all((ROOT / path).exists() for path in linked), sorted(p for p in linked if not (ROOT / p).exists())
