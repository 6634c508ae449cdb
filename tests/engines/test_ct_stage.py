"""The CT stage rule (engines.ct_stage): categories, probabilities, their stated anchors."""

from __future__ import annotations

import numpy as np
import pytest

from engines import ct_stage


@pytest.mark.parametrize(("involvement", "category"), [
    (0.0, "CT-0"), (0.29, "CT-0"), (0.3, "CT-1"), (24.9, "CT-1"), (25.0, "CT-2"),
    (49.9, "CT-2"), (50.0, "CT-3"), (74.9, "CT-3"), (75.0, "CT-4"), (100.0, "CT-4")])
def test_severity_categories_follow_the_ct0_to_ct4_bounds(involvement: float,
                                                          category: str) -> None:
    assert ct_stage.severity_category(involvement) == category
    assert ct_stage.stage(involvement).severity == category


def test_probabilities_sum_to_one_and_rise_with_involvement() -> None:
    grid = [0.0, 0.05, 0.1, 0.3, 1.0, 5.0, 30.0, 50.0, 70.0, 100.0]
    stages = [ct_stage.stage(v) for v in grid]
    for s in stages:
        assert s.proba.shape == (3,) and abs(float(s.proba.sum()) - 1.0) < 1e-12
        assert (s.proba >= 0).all()
    pneumonia = [s.p_pneumonia for s in stages]
    severe = [s.p_severe for s in stages]
    assert pneumonia == sorted(pneumonia) and severe == sorted(severe)


def test_the_measured_anchors_land_where_the_card_says() -> None:
    """normal001 measures 0.14 %, cap002 0.98 %, P002 3.46 % (docs/models/quantitative.md)."""
    normal, cap, covid = (ct_stage.stage(v) for v in (0.14, 0.98, 3.46))
    assert normal.p_pneumonia < 0.1 and int(np.argmax(normal.proba)) == 0
    assert cap.p_pneumonia > 0.95 and int(np.argmax(cap.proba)) == 1
    assert int(np.argmax(covid.proba)) == 1
    assert int(np.argmax(ct_stage.stage(60.0).proba)) == 2
    assert ct_stage.stage(50.0).p_severe == pytest.approx(0.5)
    assert ct_stage.stage(-3.0).involvement_percent == 0.0
