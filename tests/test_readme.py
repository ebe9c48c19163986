"""The README's Python examples run as written (both APIs: the reference's and the explicit state's)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    exec(compile("\n".join(blocks), str(README), "exec"), namespace)
    assert namespace["out"].shape == (1, 256, 256)
    assert namespace["sample"].shape == (1, 596)
    assert namespace["logits"].shape == (2, 64, 256)
    assert namespace["result"].tokens == 2 * 32 * 64
    assert namespace["tokens"].shape == (2, 50)
    assert [len(row) for row in namespace["rows"]] == [20, 20, 20]


def test_readme_stays_a_front_page():
    assert len(README.read_text().splitlines()) <= 150
