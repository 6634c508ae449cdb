"""The shipped model files match their manifest, and a damaged file is noticed."""

from __future__ import annotations

import shutil
from pathlib import Path

from engines import MODELS_DIR
from engines.manifest import MANIFEST_NAME, verify


def test_shipped_models_match_the_manifest() -> None:
    assert verify() == [], "run `python -m engines.manifest` after changing a model file"


def test_damaged_missing_and_unlisted_files_are_reported(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(MODELS_DIR, models)
    # the shipped files only: FP16 variants are build products a GPU run may leave beside them
    onnx = sorted(p for p in models.glob("*.onnx") if not p.name.endswith(".fp16.onnx"))
    assert len(onnx) >= 3
    data = bytearray(onnx[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx[0].write_bytes(bytes(data))
    onnx[1].unlink()
    (models / "extra.json").write_text("{}")
    problems = verify(models)
    assert f"{onnx[0].name} checksum differs from the manifest" in problems
    assert f"{onnx[1].name} missing" in problems
    assert "extra.json not in the manifest" in problems
    (models / MANIFEST_NAME).unlink()
    assert verify(models) == [f"{models / MANIFEST_NAME} missing"]
