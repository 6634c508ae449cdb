"""Deterministic DICOM UIDs for what the agent creates: see :mod:`schemas.uids`, where the
derivation lives because the UIDs and result ids are part of the contract with consumers."""

from schemas.uids import (
    HUST19_UID_NAMESPACE,
    MAX_UID_LENGTH,
    UUID_UID_ROOT,
    derive_uid,
    is_valid_uid,
    result_id,
    sr_instance_uid,
    sr_series_uid,
)

__all__ = ["HUST19_UID_NAMESPACE", "MAX_UID_LENGTH", "UUID_UID_ROOT", "derive_uid",
           "is_valid_uid", "result_id", "sr_instance_uid", "sr_series_uid"]
