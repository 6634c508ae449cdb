"""TensorRT backend on a machine without a GPU: I/O discovery and buffer planning (pure),
``__cuda_array_interface__`` parsing, availability probing and the fallback to ONNX Runtime.

What needs a GPU (building, running, cache round trip, parity) is in test_gpu_parity.py.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from engines import tensorrt_backend as trtb
from engines.backends import OnnxRuntimeBackend, create_backend
from engines.engine_cache import ProfileShape
from engines.tensorrt_backend import (
    BufferPlan,
    IoSpec,
    TensorRTBackend,
    batch_profile,
    device_array,
    io_specs_from_onnx,
    plan_buffers,
    split_batches,
)
from schemas.errors import BackendUnavailable, EngineError
from tests.engines.test_fp16 import tiny_model

NO_GPU_STACK = trtb.probe()[0] is False
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return tiny_model(tmp_path / "tiny.onnx", side=20)


def test_io_specs_from_onnx(tiny: Path) -> None:
    assert io_specs_from_onnx(tiny) == [
        IoSpec("image", (-1, 1, 20, 20), "float32", True),
        IoSpec("proba", (-1, 3), "float32", False),
    ]


def test_plan_buffers_for_dynamic_batch(tiny: Path) -> None:
    specs = io_specs_from_onnx(tiny)
    assert plan_buffers(specs, 64) == [
        BufferPlan("image", True, (64, 1, 20, 20), "float32", 64 * 400 * 4),
        BufferPlan("proba", False, (64, 3), "float32", 64 * 3 * 4),
    ]
    one = plan_buffers(specs, 1)
    assert [p.shape for p in one] == [(1, 1, 20, 20), (1, 3)]
    # the slice network: 64 crops of 200x200 float32 = 10 MiB of input
    slice_specs = [IoSpec("image", (-1, 1, 200, 200), "float32", True),
                   IoSpec("proba", (-1, 3), "float16", False)]
    plans = plan_buffers(slice_specs, 64)
    assert plans[0].nbytes == 64 * 200 * 200 * 4 and plans[1].nbytes == 64 * 3 * 2


def test_plan_buffers_refuses_what_fixed_buffers_cannot_hold() -> None:
    with pytest.raises(EngineError, match="dynamic non-batch"):
        plan_buffers([IoSpec("x", (-1, -1, 8), "float32", True)], 4)
    with pytest.raises(EngineError, match="batch must be"):
        plan_buffers([IoSpec("x", (-1, 8), "float32", True)], 0)
    with pytest.raises(EngineError, match="scalar"):
        plan_buffers([IoSpec("x", (), "float32", True)], 4)


def test_batch_profile(tiny: Path) -> None:
    specs = io_specs_from_onnx(tiny)
    assert batch_profile(specs, 64) == (
        ProfileShape("image", (1, 1, 20, 20), (16, 1, 20, 20), (64, 1, 20, 20)),)
    assert batch_profile(specs, 64, opt_batch=64)[0].opt[0] == 64
    assert batch_profile(specs, 8)[0].opt[0] == 8  # opt never above max
    with pytest.raises(EngineError):
        batch_profile(specs, 0)


def test_split_batches() -> None:
    assert split_batches(0, 64) == []
    assert split_batches(64, 64) == [slice(0, 64)]
    assert split_batches(130, 64) == [slice(0, 64), slice(64, 128), slice(128, 130)]


class _DeviceLike:
    """An object exposing ``__cuda_array_interface__`` v3 (the protocol, not a GPU)."""

    def __init__(self, **cai: Any) -> None:
        self.__cuda_array_interface__ = {"version": 3, "data": (0x7F0000000000, False), **cai}


def test_device_array_reads_the_interface() -> None:
    dense = device_array(_DeviceLike(shape=(4, 1, 200, 200), typestr="<f4", strides=None,
                                     stream=1))
    assert dense.shape == (4, 1, 200, 200) and dense.dtype == np.float32
    assert dense.row_bytes == 200 * 200 * 4 and dense.stream == 1
    explicit = device_array(_DeviceLike(shape=(2, 3), typestr="<f2", strides=(6, 2)))
    assert explicit.dtype == np.float16 and explicit.stream is None
    with pytest.raises(EngineError, match="C-contiguous"):
        device_array(_DeviceLike(shape=(2, 3), typestr="<f4", strides=(4, 8)))
    with pytest.raises(EngineError, match="no __cuda_array_interface__"):
        device_array(np.zeros((2, 3), np.float32))


def test_probe_explains_and_imports_nothing() -> None:
    ok, why = trtb.probe()
    if NO_GPU_STACK:
        assert not ok
        assert "not installed" in why or "no usable NVIDIA GPU" in why
    assert "tensorrt" not in sys.modules and "pycuda" not in sys.modules


@pytest.mark.skipif(not NO_GPU_STACK, reason="checks the CPU-only fallback; this box has a GPU")
def test_auto_picks_onnxruntime_and_says_why(tiny: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        backend = create_backend(tiny, "auto", cache_dir=tiny.parent / "engines")
    assert isinstance(backend, OnnxRuntimeBackend)
    assert "TensorRT backend not usable" in caplog.text
    x = np.random.default_rng(0).random((3, 1, 20, 20), dtype=np.float32)
    p = backend.run1(x)
    assert p.shape == (3, 3)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.skipif(not NO_GPU_STACK, reason="checks the CPU-only fallback; this box has a GPU")
def test_tensorrt_requested_without_gpu_falls_back_with_warning(
        tiny: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="engines.backends"):
        backend = create_backend(tiny, "tensorrt", cache_dir=tiny.parent / "engines")
    assert isinstance(backend, OnnxRuntimeBackend)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "TensorRT requested but not usable" in warnings[0].getMessage()


@pytest.mark.skipif(not NO_GPU_STACK, reason="checks the CPU-only fallback; this box has a GPU")
def test_direct_construction_without_tensorrt_is_backend_unavailable(tiny: Path) -> None:
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        TensorRTBackend(tiny, cache_dir=tiny.parent / "engines")
    assert not (tiny.parent / "engines").exists()  # nothing built or cached


def test_bad_arguments_are_engine_errors(tiny: Path) -> None:
    with pytest.raises(EngineError, match="precision"):
        TensorRTBackend(tiny, precision="int8")  # type: ignore[arg-type]
    with pytest.raises(EngineError, match="not found"):
        TensorRTBackend(tiny.parent / "missing.onnx")


def test_strong_typing_decision_by_version() -> None:
    """Version logic only (TensorRT cannot be imported here): 11+ is always strongly typed,
    10.x when it has the creation flag."""
    flags_with = SimpleNamespace(STRONGLY_TYPED=0)
    flags_without = SimpleNamespace()
    assert trtb._strongly_typed(SimpleNamespace(__version__="11.1.0.1",
                                                NetworkDefinitionCreationFlag=flags_without))
    assert trtb._strongly_typed(SimpleNamespace(__version__="10.13.3.9",
                                                NetworkDefinitionCreationFlag=flags_with))
    assert not trtb._strongly_typed(SimpleNamespace(__version__="8.6.1",
                                                    NetworkDefinitionCreationFlag=flags_without))


def test_numpy_dtype_without_nptype() -> None:
    half = SimpleNamespace(name="HALF")
    assert trtb._numpy_dtype(SimpleNamespace(), half) == "float16"
    assert trtb._numpy_dtype(SimpleNamespace(nptype=lambda _: np.float32), half) == "float32"
    with pytest.raises(BackendUnavailable):
        trtb._numpy_dtype(SimpleNamespace(), SimpleNamespace(name="FP8"))


@pytest.mark.skipif(not NO_GPU_STACK, reason="checks the no-GPU JSON error; this box has a GPU")
def test_gpu_benchmark_reports_json_error_without_gpu() -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "engines_gpu.py")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    report = json.loads(done.stdout)
    assert "no TensorRT GPU backend here" in report["error"]
    assert report["probe"]["devices"] == []
