"""Deterministic DICOM UIDs for what the agent creates.

Every UID the agent writes (the SR series, the SR instance, the device observer, the tracking
identifier) is *derived* from the inputs that define the object, never drawn at random, so that
reprocessing the same series with the same model version yields the same SR SOP Instance UID:
a redo after a crash replaces the report at the PACS instead of adding a second one.

The derivation is the one PS3.5 B.2 allows for UUID-based UIDs: the ``2.25`` root followed by
the decimal value of a UUID. The UUID is a name-based UUID version 5 (SHA-1, ITU-T X.667) in a
namespace fixed for this product, over the JSON encoding of the parts (so ``("ab", "c")`` and
``("a", "bc")`` differ). The result is at most 44 characters and never has a leading zero.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Final

UUID_UID_ROOT: Final = "2.25"
"""PS3.5 B.2: UIDs derived from a UUID live under this root."""

MAX_UID_LENGTH: Final = 64
"""PS3.5 9.1: a UID is at most 64 characters."""

HUST19_UID_NAMESPACE: Final = uuid.UUID("5b0c6f0e-2f7a-5d43-9a57-3c1d1e6a1919")
"""The product's UUID namespace. Changing it changes every derived UID: never change it."""

_UID_RE: Final = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: str) -> bool:
    """True when ``value`` is a syntactically valid DICOM UID (PS3.5 9.1): dot-separated
    numeric components without leading zeros, at most 64 characters."""
    return 0 < len(value) <= MAX_UID_LENGTH and _UID_RE.match(value) is not None


def derive_uid(*parts: str) -> str:
    """A DICOM UID that depends only on ``parts``: the same parts always give the same UID,
    different parts give different UIDs (up to SHA-1 collisions, i.e. never in practice)."""
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    name = json.dumps(list(parts), ensure_ascii=True, separators=(",", ":"))
    uid = f"{UUID_UID_ROOT}.{uuid.uuid5(HUST19_UID_NAMESPACE, name).int}"
    assert is_valid_uid(uid)  # 2.25. + at most 39 digits: always valid
    return uid


def sr_series_uid(study_uid: str, model_version: str) -> str:
    """Series Instance UID of the agent's SR series in ``study_uid`` for ``model_version``:
    all the SRs one model version writes into a study share one series."""
    return derive_uid("sr-series", study_uid, model_version)


def sr_instance_uid(series_uid: str, model_version: str) -> str:
    """SOP Instance UID of the SR reporting on source series ``series_uid`` under
    ``model_version``. The same series and model version always give the same UID."""
    return derive_uid("sr-instance", series_uid, model_version)


def result_id(series_uid: str) -> str:
    """The ``result_id`` of every triage result about source series ``series_uid``: stable
    across revisions, redeliveries and model versions, so consumers can keep the latest."""
    return derive_uid("triage-result", series_uid)
