"""The README's ONNX sections run as written ("Bring your model", "Take your model away")."""
import os
import re

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def blocks(section):
    text = open(README).read()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.S)


@pytest.mark.parametrize("section", ["Bring your model", "Take your model away"])
def test_readme_onnx_code_runs(section, tmp_path, monkeypatch):
    code = blocks(section)
    assert code, f"README section {section!r} has no python block"
    if "import torch" in "".join(code):
        pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    for block in code:
        scope = {}
        exec(compile(block, f"README: {section}", "exec"), scope)
    if section == "Bring your model":
        assert 0 < scope["loss"] < 10 and scope["g"].loss == "loss"
    else:
        assert scope["logits"].shape == (4, 10)
