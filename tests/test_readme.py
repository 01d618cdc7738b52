"""The README's Python blocks run, in order, in one namespace: the documentation cannot rot."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_usage_blocks():
    assert len(python_blocks()) >= 4


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for i, block in enumerate(python_blocks()):
        exec(compile(block.replace("/tmp/", f"{tmp_path}/"), f"README block {i}", "exec"), namespace)
