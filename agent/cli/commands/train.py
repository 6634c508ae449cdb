"""``hust19 train {slice,patient,cf,fusion,evidence}``."""

from __future__ import annotations

from typing import Any

from agent.cli.commands._targets import register_targets

TARGETS = {
    "slice": "engines.training.slice",
    "patient": "engines.training.patient",
    "cf": "engines.training.cf",
    "fusion": "engines.training.fusion",
    "evidence": "engines.training.evidence",
}


def register(sub: Any) -> None:
    register_targets(sub, "train", "train a HUST-19 model (needs the 'train' extra)", TARGETS)
