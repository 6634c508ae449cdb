"""The paper's slice selection (NiCT filter, top-10 pCT, slice order) and the patient CNN."""

from __future__ import annotations

import numpy as np
import pytest

from engines.patient_model import PatientModel, select_top, stack
from schemas.errors import EngineError


def _scores(nict: list[float], pct: list[float]) -> np.ndarray:
    nict_a, pct_a = np.array(nict), np.array(pct)
    return np.stack([nict_a, pct_a, 1 - nict_a - pct_a], axis=1)


def test_nict_filter_top_k_and_slice_order() -> None:
    # slice 0 has the highest pCT but is non-informative (NiCT 0.6) and must be dropped
    scores = _scores([0.6, 0.1, 0.0, 0.5, 0.2, 0.0], [0.4, 0.2, 0.9, 0.3, 0.8, 0.1])
    assert select_top(scores, k=3).tolist() == [2, 3, 4]  # the three best, in slice order
    # the order keys decide slice order, not the input order
    keys = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    assert select_top(scores, keys, k=3).tolist() == [4, 3, 2]
    # NiCT exactly 0.5 is kept (paper: NiCT score <= 0.5)
    assert 3 in select_top(scores, k=5).tolist()


def test_ties_prefer_the_earlier_slice_and_few_slices_are_all_kept() -> None:
    scores = _scores([0.0] * 4, [0.5] * 4)
    assert select_top(scores, k=2).tolist() == [0, 1]
    assert select_top(scores, k=10).tolist() == [0, 1, 2, 3]
    assert select_top(_scores([0.9, 0.8], [0.05, 0.1])).size == 0
    with pytest.raises(EngineError):
        select_top(scores, [1.0, 2.0])


def test_stack_pads_with_blank_slices() -> None:
    crops = [np.full((200, 200), v, np.uint8) for v in (10, 20, 30)]
    s = stack(crops)
    assert s.shape == (10, 200, 200) and s.dtype == np.uint8
    assert [int(s[i, 0, 0]) for i in range(10)] == [10, 20, 30] + [0] * 7
    with pytest.raises(EngineError):
        stack(crops * 4)


def test_shipped_patient_model_scores_stacks() -> None:
    model = PatientModel.load(backend="onnxruntime")
    assert model.classes == ("control", "type1", "type2")
    rng = np.random.default_rng(0)
    stacks = rng.integers(0, 256, (2, 10, 200, 200), dtype=np.uint8)
    both = model.score(stacks)
    assert both.shape == (2, 3)
    np.testing.assert_allclose(both.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(model.score(stacks[1]), both[1], atol=1e-5)
    with pytest.raises(EngineError):
        model.score(stacks[:, :5])
