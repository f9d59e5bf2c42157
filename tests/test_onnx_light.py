"""The onnx wheel's light/ models (AlexNet, DenseNet121, Inception v1/v2, ResNet50, ShuffleNet, SqueezeNet,
VGG19, ZFNet512) with seeded random weights in place of their constant 0.02 ones: graphc's reference
backend against onnxruntime on one image, on the logits (the final softmax's input) and the output,
rtol 1e-3 and atol 1e-4 x the output's magnitude. These are the suite's heaviest ONNX tests (VGG19 has
143M weights); `python tests/onnx_cases.py light numba` runs the same check on the numba backend."""
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx_cases as oc  # noqa: E402


@pytest.mark.parametrize("name", oc.LIGHT)
def test_light_model_matches_onnxruntime(name, record_property):
    r = oc.run_light(name)
    if r["status"] == "waits":
        pytest.skip(r["detail"])
    assert r["status"] == "pass", r
    for out, (err, scale) in r["errors"].items():
        record_property(f"max_abs_err[{out}]", f"{err:.3g} (max |ref| {scale:.3g})")
