"""``hust19 engines``: plain errors without a GPU, the cache listing, FP16 variants; run as a
real process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import EXIT_FAILURE
from engines.engine_cache import EngineCache, EngineKey, ProfileShape
from engines.tensorrt_backend import probe
from tests.engines.test_fp16 import tiny_model
from tests.fixtures.paths import REPO


def _hust19(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True,
                          text=True, timeout=120, check=False, cwd=REPO)


@pytest.mark.skipif(probe()[0], reason="checks the refusal on a box without GPU; this has one")
def test_build_without_gpu_exits_with_one_plain_line(tmp_path: Path) -> None:
    tiny_model(tmp_path / "tiny.onnx")
    done = _hust19("engines", "build", "--engine-cache", str(tmp_path / "cache"),
                   "--models-dir", str(tmp_path))
    assert done.returncode == EXIT_FAILURE
    assert "Traceback" not in done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("hust19: error:")]
    assert len(error) == 1
    assert "cannot build TensorRT engines here" in error[0]
    assert "ONNX Runtime" in error[0]
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_list_shows_entries_and_damage(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    assert "no engines in" in _hust19("engines", "list", "--engine-cache", str(cache_dir)).stdout
    cache = EngineCache(cache_dir)
    for model in ("slice", "patient"):
        key = EngineKey(model, "f" * 64, "11.1.0", "NVIDIA L4", "8.9", "fp16",
                        (ProfileShape("image", (1, 1, 200, 200), (16, 1, 200, 200),
                                      (64, 1, 200, 200)),), 1 << 30)
        cache.store(key, model.encode() * 1000, 3.5)
    slice_engine = next(cache_dir.glob("slice.*.engine"))
    slice_engine.write_bytes(b"torn")
    done = _hust19("engines", "list", "--engine-cache", str(cache_dir))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    patient = next(line for line in lines if "model=patient" in line)
    assert "status=ok" in patient and "gpu='NVIDIA L4'" in patient and "sm=8.9" in patient
    assert "status=corrupt" in next(line for line in lines if "model=slice" in line)
    rows = [json.loads(x) for x in _hust19("engines", "list", "--engine-cache", str(cache_dir),
                                           "--json").stdout.splitlines()]
    assert {r["key"]["model_name"] for r in rows} == {"slice", "patient"}
    assert [r["problem"] is None for r in sorted(rows, key=lambda r: r["key"]["model_name"])] \
        == [True, False]


@pytest.mark.slow
def test_fp16_writes_checked_variants(tmp_path: Path) -> None:
    tiny_model(tmp_path / "a.onnx", seed=1)
    tiny_model(tmp_path / "b.onnx", seed=2)
    done = _hust19("engines", "fp16", "--models-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "a.fp16.onnx").is_file() and (tmp_path / "b.fp16.onnx").is_file()
    assert done.stdout.count("max |p_fp16 - p_fp32|") == 2
    # a second run sees only the two FP32 models, not the variants
    assert _hust19("engines", "fp16", "--models-dir", str(tmp_path)).stdout.count("->") == 2
