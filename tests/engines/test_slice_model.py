"""The shipped slice model at run time: metadata, checksum, micro-batching, real slices."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from engines import lung, preprocess
from engines.slice_model import MODELS_DIR, NICT, PCT, SliceModel, load_metadata
from schemas.errors import EngineError


def test_metadata_matches_the_shipped_file() -> None:
    meta = load_metadata(MODELS_DIR / "slice.onnx")
    assert meta["classes"] == ["NiCT", "pCT", "nCT"]
    assert meta["thresholds"]["nict_max"] == 0.5
    assert meta["opset"] >= 17
    assert meta["input"]["shape"] == ["batch", 1, 200, 200]


def test_a_tampered_model_is_refused(tmp_path: Path) -> None:
    onnx = tmp_path / "slice.onnx"
    shutil.copy(MODELS_DIR / "slice.onnx", onnx)
    meta = json.loads((MODELS_DIR / "slice.json").read_text())
    meta["sha256"] = "0" * 64
    (tmp_path / "slice.json").write_text(json.dumps(meta))
    with pytest.raises(EngineError, match="checksum"):
        SliceModel.load(onnx, "onnxruntime")


def test_micro_batches_agree_with_one_batch() -> None:
    crops = np.random.default_rng(0).integers(0, 256, (5, 200, 200), dtype=np.uint8)
    a = SliceModel.load(backend="onnxruntime", batch_size=2).score(crops)
    b = SliceModel.load(backend="onnxruntime", batch_size=8).score(crops)
    assert a.shape == (5, 3)
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(EngineError):
        SliceModel.load(backend="onnxruntime").score(crops[:, :100])


def test_real_slices_apex_is_nict_and_infected_slice_is_pct(chest_series: Path) -> None:
    """P002 slice label index 0 (above the lungs) and the most clearly infected labelled slice:
    the shipped model must call the first NiCT and give the second a higher pCT score."""
    import csv

    rows = list(csv.DictReader((chest_series / "P002-slices.csv").open()))
    rows.sort(key=lambda r: int(r["label_index"]))
    infected = [r for r in rows if r["infection"] == "1"]
    picks = [rows[0], infected[len(infected) // 2]]
    crops = np.stack([lung.extract(preprocess.dataset_to_u8(
        pydicom.dcmread(chest_series / "P002" / r["file"]))).crop for r in picks])
    proba = SliceModel.load(backend="onnxruntime").score(crops)
    assert proba[0, NICT] > 0.5
    assert proba[1, NICT] <= 0.5
    assert proba[1, PCT] > proba[0, PCT]


@pytest.mark.slow
def test_shipped_model_ranks_the_held_out_series_infected_slices_first(
        chest_series: Path) -> None:
    """cap002 was never trained on: the radiologists' infected slices must get the higher pCT
    scores (AUC >= 0.85; the model card measured 0.924) and no uninfected slice may reach the
    0.5 cut (measured: none). A regression check, not a gate: cap002 chose the recipe, and the
    kept-back series measured 0.420 (docs/models/slice.md). Guards against installing an
    uninformative retraining."""
    import csv

    from engines import metrics

    rows = list(csv.DictReader((chest_series / "cap002-slices.csv").open()))
    crops = np.stack([lung.extract(preprocess.dataset_to_u8(
        pydicom.dcmread(chest_series / "cap002" / r["file"]))).crop for r in rows])
    infected = np.array([r["infection"] == "1" for r in rows])
    pct = SliceModel.load(backend="onnxruntime").score(crops)[:, PCT]
    assert metrics.roc_auc(infected, pct) >= 0.85
    assert not np.any(pct[~infected] >= 0.5)


@pytest.mark.slow
def test_the_pre_processing_still_gives_the_shipped_model_its_training_inputs(
        shared_data: Path) -> None:
    """The shipped slice CNN only knows the crops it was trained on: the same sources, run
    through today's pre-processing, must give those crops (by SHA-256, or per slice within
    the fingerprint's tolerances). Fails when windowing, lung extraction or decoding changed
    behaviour without a retraining."""
    from engines.training import slice as train_slice

    meta = load_metadata(MODELS_DIR / "slice.onnx")
    training = meta["training"]
    sources = train_slice.training_sources(shared_data, tuple(training["series"]),
                                           training["limit"], training["public"])
    images = train_slice.preprocess_sources(sources, None, progress=False)
    assert images.counts() == training["class_counts"]
    recorded = meta["preprocessing"]["training_inputs"]
    assert train_slice.fingerprint_problems(recorded, images) == []
