"""``hust19 evaluate {slices,cf,cv {cf,slice}}``."""

from __future__ import annotations

from typing import Any

from agent.cli.commands._targets import register_targets

TARGETS: dict[str, Any] = {
    "slices": "engines.evaluation.slices",
    "cf": "engines.evaluation.cf",
    "cv": {"cf": "engines.evaluation.cv_cf", "slice": "engines.evaluation.cv_slice"},
}


def register(sub: Any) -> None:
    register_targets(sub, "evaluate", "evaluate the shipped models as the paper does", TARGETS)
