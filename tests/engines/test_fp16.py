"""FP16 ONNX variants: conversion, accuracy check against FP32 in ONNX Runtime CPU, staleness.

A tiny conv net (built with ``onnx.helper``, dynamic batch, softmax output like the HUST-19
networks) keeps this fast; the shipped models are checked too when they are present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.fp16 import (
    SOURCE_SHA_KEY,
    check_inputs,
    convert_to_fp16,
    ensure_fp16,
    fp16_path,
    is_current,
    source_sha256_of,
)
from schemas.errors import EngineError

MODELS = Path(__file__).resolve().parents[2] / "engines" / "models"
SHIPPED = sorted(p for p in MODELS.glob("*.onnx") if not p.name.endswith(".fp16.onnx"))


def tiny_model(path: Path, seed: int = 0, side: int = 16) -> Path:
    """image (N,1,side,side) -> conv 3x3 x4 -> relu -> global avg pool -> dense 3 -> softmax."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "b")
    fw = numpy_helper.from_array(rng.normal(0, 1.0, (4, 3)).astype(np.float32), "fw")
    fb = numpy_helper.from_array(rng.normal(0, 0.1, (3,)).astype(np.float32), "fb")
    nodes = [
        helper.make_node("Conv", ["image", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["proba"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, side, side])],
        [helper.make_tensor_value_info("proba", TensorProto.FLOAT, ["batch", 3])],
        [w, b, fw, fb])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_fp16_variant_written_beside_and_close_to_fp32(tmp_path: Path) -> None:
    src = tiny_model(tmp_path / "tiny.onnx")
    report = convert_to_fp16(src)
    assert report.target == tmp_path / "tiny.fp16.onnx" == fp16_path(src)
    assert report.written and report.target.is_file()
    assert 0.0 < report.max_abs_diff < 1e-2  # it really changed precision, within tolerance
    model = onnx.load(str(report.target))
    # weights are FP16, inputs and outputs stay FP32 (keep_io_types)
    assert {i.data_type for i in model.graph.initializer} == {TensorProto.FLOAT16}
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert {p.key: p.value for p in model.metadata_props}[SOURCE_SHA_KEY] == report.source_sha256
    # independent re-check with real ORT sessions, batch different from the check batch
    x = np.random.default_rng(1).random((5, 1, 16, 16), dtype=np.float32)
    p32 = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None,
                                                                             {"image": x})[0]
    p16 = ort.InferenceSession(str(report.target),
                               providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert p16.dtype == np.float32 and p16.shape == (5, 3)
    np.testing.assert_allclose(p16, p32, atol=1e-2)


def test_variant_beyond_tolerance_is_not_written(tmp_path: Path) -> None:
    src = tiny_model(tmp_path / "tiny.onnx")
    with pytest.raises(EngineError, match="differs from FP32"):
        convert_to_fp16(src, tolerance=1e-12)
    assert not fp16_path(src).exists()


def test_staleness_follows_the_source_file(tmp_path: Path) -> None:
    src = tiny_model(tmp_path / "tiny.onnx")
    variant = ensure_fp16(src)
    assert is_current(variant, src)
    mtime = variant.stat().st_mtime_ns
    assert ensure_fp16(src) == variant and variant.stat().st_mtime_ns == mtime  # reused
    tiny_model(src, seed=7)  # retrained model, same name
    assert not is_current(variant, src)
    again = ensure_fp16(src)
    assert again == variant and is_current(again, src)
    assert source_sha256_of(src) is None  # an FP32 model carries no source hash


def test_unwritable_beside_falls_back_to_cache_dir(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    src = tiny_model(models / "tiny.onnx")
    (models / "tiny.fp16.onnx" / "occupied").mkdir(parents=True)  # cannot be replaced
    variant = ensure_fp16(src, fallback_dir=tmp_path / "cache" / "onnx")
    assert variant == tmp_path / "cache" / "onnx" / "tiny.fp16.onnx"
    assert is_current(variant, src)


def test_check_inputs_follow_the_model_inputs(tmp_path: Path) -> None:
    src = tiny_model(tmp_path / "tiny.onnx", side=12)
    sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    x = check_inputs(sess, batch=3)
    assert x["image"].shape == (3, 1, 12, 12) and x["image"].dtype == np.float32
    assert float(x["image"].min()) >= 0.0 and float(x["image"].max()) < 1.0


@pytest.mark.slow
@pytest.mark.parametrize("model", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_model_fp16_within_tolerance(tmp_path: Path, model: Path) -> None:
    report = convert_to_fp16(model, tmp_path / fp16_path(model).name)
    assert report.max_abs_diff < 1e-2
