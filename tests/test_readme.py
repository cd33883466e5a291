"""The README's Python examples run as written."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# Documents whose examples continue the README's (they use its model, memory and data).
DOCS = [ROOT / "docs" / "saving.md"]


def python_blocks(path: pathlib.Path = README) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


def test_readme_has_the_three_lines_and_the_two_commands():
    text = README.read_text()
    assert "train_set = IndexedDataset(train_set)" in text
    assert "memory = MemoryWrapper(model, num_samples=len(train_set)" in text
    assert "loss = loss + memory(idx, x, x_adv, logits, y)" in text
    assert 'pip install ".[attacks,examples]" && memloss compare --dataset digits' in text
    assert 'pip install -e ".[dev]" && python -m pytest' in text


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    blocks = python_blocks()
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for path in (README, *DOCS):
        for block in python_blocks(path):
            exec(compile(block.replace("/tmp/", f"{tmp_path}/"), str(path), "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("0 1.0 0.0")  # epoch 1: memory filled, term still 0
    epoch, filled, term = printed[1].split()
    assert epoch == "1" and filled == "1.0" and float(term) > 0
    memory = namespace["memory"]
    assert memory.stats()["filled_fraction"] == 1.0
