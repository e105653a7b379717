"""The README's Python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md has no python example"
    names: dict = {}  # every block runs alone; their results are checked together
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)
        names.update(namespace)
    assert names["y"].shape == (1, 128, 4, 64)
    assert names["some"].shape == (1, 2, names["logits"].shape[-1])
    assert names["next_token"].shape == (1,)
    assert len(names["result"].tokens) == 2  # "Generate": two prompts
