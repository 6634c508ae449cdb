"""Names of the bus topics and of the message headers: the only place they are spelled."""

from __future__ import annotations

from typing import Final

DICOM_INSTANCES: Final = "dicom.instances"
"""One message per received instance: key SeriesInstanceUID, value the Part-10 file bytes."""

DICOM_SERIES: Final = "dicom.series"
"""Series-completion events (:class:`schemas.messages.SeriesEvent`), key SeriesInstanceUID."""

TRIAGE_RESULTS: Final = "triage.results"
"""Triage results (:class:`schemas.messages.TriageResult`), key StudyInstanceUID."""

TRIAGE_EVIDENCE: Final = "triage.evidence"
"""Evidence-slice thumbnails of each result (:class:`schemas.messages.EvidenceThumbnails`),
key SeriesInstanceUID: for dashboards, so they need not reach into the PACS."""

TRIAGE_DLQ: Final = "triage.dlq"
"""What could not be processed (:class:`schemas.messages.DeadLetter`), key as the original."""

ALL_TOPICS: Final = (DICOM_INSTANCES, DICOM_SERIES, TRIAGE_RESULTS, TRIAGE_EVIDENCE,
                     TRIAGE_DLQ)

# Header names on dicom.instances messages (values are UTF-8 bytes).
H_SCHEMA: Final = "schema"
H_STUDY_UID: Final = "study_uid"
H_SERIES_UID: Final = "series_uid"
H_SOP_INSTANCE_UID: Final = "sop_instance_uid"
H_SOP_CLASS_UID: Final = "sop_class_uid"
H_TRANSFER_SYNTAX: Final = "transfer_syntax_uid"
H_CALLING_AE: Final = "calling_ae"
H_RECEIVED_AT: Final = "received_at"
