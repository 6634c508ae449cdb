"""SeriesScorer (streaming CT scoring: the quantitative CT of the volume and the paper's CNN
path) and decide() on real slices and the shipped models."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest

from engines import preprocess
from engines.evidence import EvidenceModel
from engines.patient_model import PatientModel, select_top, stack
from engines.slice_model import SliceModel
from engines.triage import (
    NO_USABLE_SLICE,
    SeriesScorer,
    SliceInput,
    decide,
    order_key,
    slice_input,
)
from schemas.errors import InputError

N_SLICES = 24


@pytest.fixture(scope="module")
def models() -> tuple[SliceModel, PatientModel]:
    return SliceModel.load(backend="onnxruntime"), PatientModel.load(backend="onnxruntime")


@pytest.fixture(scope="module")
def p002_inputs(chest_series: Path) -> list[SliceInput]:
    """Every 4th slice of P002 from the upper chest down (24 slices), file names as ids (the
    series has empty SOP Instance UIDs), order key = label index (cranio-caudal)."""
    rows = sorted(csv.DictReader((chest_series / "P002-slices.csv").open()),
                  key=lambda r: int(r["label_index"]))[20::4][:N_SLICES]
    return [SliceInput(r["file"], float(r["label_index"]), preprocess.dataset_to_u8(
        pydicom.dcmread(chest_series / "P002" / r["file"]))) for r in rows]


def test_streaming_order_and_batching_do_not_change_the_result(
        models: tuple[SliceModel, PatientModel], p002_inputs: list[SliceInput]) -> None:
    """The paper's CNN path (``ct_source='patient_cnn'``): slices without HU."""
    one = SeriesScorer(*models, series_uid="P002", ct_source="patient_cnn")
    one.add_slices(p002_inputs)
    a = one.finish()
    shuffled = [p002_inputs[i] for i in np.random.default_rng(3).permutation(N_SLICES)]
    many = SeriesScorer(*models, series_uid="P002", ct_source="patient_cnn")
    for start in range(0, N_SLICES, 5):
        many.add_slices(shuffled[start:start + 5])
    b = many.finish()
    assert a.proba is not None and b.proba is not None
    np.testing.assert_allclose(a.proba, b.proba, atol=1e-5)
    assert a.top_uids == b.top_uids
    assert a.n_slices == b.n_slices == N_SLICES
    assert 0 < len(a.top_uids) <= 10
    assert a.cnn_proba is not None and a.analysis is None


def test_selection_and_stack_equal_the_batch_definition(
        models: tuple[SliceModel, PatientModel], p002_inputs: list[SliceInput]) -> None:
    """The streaming top-10 equals select_top over all scores, in slice order."""
    from engines import lung

    slice_model, patient_model = models
    scorer = SeriesScorer(slice_model, patient_model, ct_source="patient_cnn")
    scorer.add_slices(p002_inputs)
    result = scorer.finish()
    crops = np.stack([lung.extract(s.image_u8).crop for s in p002_inputs])
    scores = slice_model.score(crops)
    chosen = select_top(scores, [s.order_key for s in p002_inputs])
    assert result.top_uids == tuple(p002_inputs[i].uid for i in chosen)
    assert result.proba is not None
    np.testing.assert_allclose(result.proba, patient_model.score(stack(crops[chosen])),
                               atol=1e-5)
    keys = [s.order_key for s in result.slices]
    assert keys == sorted(keys)


def test_blank_slices_give_no_ct_result(models: tuple[SliceModel, PatientModel]) -> None:
    scorer = SeriesScorer(*models, series_uid="blank", ct_source="patient_cnn")
    scorer.add_slices([SliceInput(f"b{i}", float(i), np.zeros((512, 512), np.uint8))
                       for i in range(3)])
    result = scorer.finish()
    assert result.proba is None
    assert result.reason == NO_USABLE_SLICE
    assert result.to_dict()["scores"] is None
    quantitative = SeriesScorer(*models, series_uid="blank",
                                evidence_model=EvidenceModel.load())
    quantitative.add_slices([SliceInput(f"b{i}", float(i), np.zeros((512, 512), np.uint8))
                             for i in range(3)])
    result = quantitative.finish()
    assert result.proba is None and result.analysis is None
    assert result.reason is not None and "no HU slices" in result.reason


def test_add_datasets_needs_ids_when_sop_uid_is_empty(
        models: tuple[SliceModel, PatientModel], chest_series: Path) -> None:
    ds = pydicom.dcmread(next(iter(sorted((chest_series / "P002").iterdir()))))
    assert not ds.SOPInstanceUID
    assert order_key(ds) is not None
    scorer = SeriesScorer(*models, series_uid="P002")
    with pytest.raises(InputError, match="SOP Instance UID"):
        scorer.add_datasets([ds])
    assert len(scorer.add_datasets([ds], uids=["file:x"])) == 1


def test_decide_ct_only_and_missing_everything() -> None:
    from engines.fusion import DEFAULT_JSON

    if not DEFAULT_JSON.is_file():
        pytest.fail(f"the shipped fusion model {DEFAULT_JSON} is missing")
    d = decide(np.array([0.1, 0.6, 0.3]), None, "general")
    assert d.mode == "ct_only"
    assert d.flag == d.flag_general
    assert d.flag in ("control", "type1", "type2")
    assert decide(np.array([0.1, 0.6, 0.3]), None, "sensitive").flag == d.flag_sensitive
    with pytest.raises(InputError):
        decide(None, None)


@pytest.fixture(scope="module")
def p002_full(chest_series: Path) -> list[SliceInput]:
    """Every slice of P002 with HU and geometry (file names as ids)."""
    files = sorted((chest_series / "P002").iterdir())
    return [slice_input(pydicom.dcmread(f), f.name, series_uid="P002") for f in files]


@pytest.mark.slow
def test_quantitative_ct_is_the_same_whatever_the_arrival_order(
        models: tuple[SliceModel, PatientModel], p002_full: list[SliceInput]) -> None:
    evidence = EvidenceModel.load()
    one = SeriesScorer(*models, series_uid="P002", evidence_model=evidence)
    one.add_slices(p002_full)
    a = one.finish()
    shuffled = [p002_full[i] for i in np.random.default_rng(7).permutation(len(p002_full))]
    many = SeriesScorer(*models, series_uid="P002", evidence_model=evidence)
    for start in range(0, len(shuffled), 16):
        many.add_slices(shuffled[start:start + 16])
    b = many.finish()
    assert a.source == b.source == "quantitative"
    assert a.analysis is not None and b.analysis is not None
    assert a.analysis.keys == b.analysis.keys
    assert a.involvement_percent() == b.involvement_percent() is not None
    assert a.proba is not None and b.proba is not None
    np.testing.assert_allclose(a.proba, b.proba)
    assert a.top_uids == b.top_uids == a.analysis.top_keys and len(a.top_uids) == 10
    assert int(np.argmax(a.proba)) == 1  # P002: pneumonia (CT-1), not control
    assert a.cnn_proba is not None  # the patient CNN is reported beside it
    assert [uid for uid, *_ in a.thumbnails] == list(a.top_uids)
    assert all(png.startswith(b"\x89PNG") and max(w, h) == 128 for _, png, w, h in a.thumbnails)
    assert many.finish() is b, "a repeated finish() without new slices is not recomputed"
    held = many.volume_bytes
    assert held == sum(s.hu.nbytes for s in p002_full if s.hu is not None)
    many.release()
    assert many.volume_bytes == 0
    many.add_slices(shuffled[:1])  # a late (here: repeated) slice after the release
    c = many.finish()
    assert c is not b and c.analysis is b.analysis, "the released volume's CT is kept"


def test_a_series_past_the_memory_budget_is_not_measured_and_says_why(
        models: tuple[SliceModel, PatientModel], p002_inputs: list[SliceInput],
        chest_series: Path) -> None:
    """The HU kept per series is bounded: past the budget it is dropped, the quantitative CT
    gives a reason, and the CNN path still runs."""
    files = sorted((chest_series / "P002").iterdir())[40:52]
    inputs = [slice_input(pydicom.dcmread(f), f.name, series_uid="P002") for f in files]
    one_slice = inputs[0].hu.nbytes if inputs[0].hu is not None else 0
    scorer = SeriesScorer(*models, series_uid="P002", evidence_model=EvidenceModel.load(),
                          max_volume_bytes=5 * one_slice)
    scorer.add_slices(inputs)
    assert scorer.volume_bytes == 0
    result = scorer.finish()
    assert result.analysis is None and result.proba is None
    assert result.reason is not None and "memory budget" in result.reason
    assert result.cnn_proba is not None
