"""The DICOM Structured Report that carries a triage result back to the PACS.

One Comprehensive SR (TID 1500 Measurement Report, built with highdicom) per triaged series, in
the study of that series, in a series of its own. Its content tree::

    Imaging Measurement Report (TID 1500)
    ├── language, device observer (the algorithm), procedure reported: CT of chest
    └── Imaging Measurements
        └── Measurement Group (TID 1501), tracking id, finding COVID-19, site lung, algorithm
            ├── CODE  HUST-19 triage category = control | Type I | Type II
            ├── CODE  decision threshold = general | sensitive
            ├── CODE  fusion = PLR | CT only | CF only;  CT used = yes/no;  CF used = yes/no
            ├── TEXT  why a modality was not used (only when it was not)
            ├── NUM   probability of control / Type I / Type II, method = CT | CF | fused
            │         (only for the modalities that produced scores)
            └── IMAGE source images: the evidence slices

Codes: SNOMED CT for what the standard covers (COVID-19, lung, CT of chest, yes/no); the three
HUST-19 categories, the score names and the model kinds have no standard code and use the
private coding scheme ``99HUST19``, declared in the Coding Scheme Identification Sequence.

Determinism: the SR series and SOP Instance UIDs come from :mod:`agent.uids` (source series +
model version), and every date/time in the object is the result's ``result_ready`` time, so the
same :class:`TriageResult` and :class:`SrSource` give a byte-identical dataset.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC
from typing import Final

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    ComprehensiveSR,
    DeviceObserverIdentifyingAttributes,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from highdicom.sr.enum import RelationshipTypeValues
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM

from agent.uids import derive_uid, is_valid_uid, sr_instance_uid, sr_series_uid
from schemas.errors import DicomInputError, InputError
from schemas.messages import ClassScores, Flag, TriageResult

logger = logging.getLogger(__name__)

# --- the private coding scheme --------------------------------------------------------------
PRIVATE_SCHEME: Final = "99HUST19"
"""Coding Scheme Designator of the product's private codes (PS3.16 8.2: private schemes start
with ``99``)."""
PRIVATE_SCHEME_NAME: Final = "HUST-19 triage agent codes"

TRIAGE_CATEGORY: Final = Code("TRIAGE", PRIVATE_SCHEME, "HUST-19 triage category")
CATEGORY_CODES: Final[dict[str, Code]] = {
    "control": Code("CONTROL", PRIVATE_SCHEME, "Control (not COVID-19)"),
    "type1": Code("TYPE1", PRIVATE_SCHEME, "Type I (mild or regular COVID-19)"),
    "type2": Code("TYPE2", PRIVATE_SCHEME, "Type II (severe or critically ill COVID-19)"),
}
THRESHOLD: Final = Code("THRESHOLD", PRIVATE_SCHEME, "Decision threshold")
THRESHOLD_CODES: Final[dict[str, Code]] = {
    "general": Code("GENERAL", PRIVATE_SCHEME, "General threshold"),
    "sensitive": Code("SENSITIVE", PRIVATE_SCHEME, "Sensitive threshold"),
}
FUSION: Final = Code("FUSION", PRIVATE_SCHEME, "Modality fusion")
FUSION_CODES: Final[dict[str, Code]] = {
    "plr": Code("PLR", PRIVATE_SCHEME, "Penalised logistic regression of CT and CF"),
    "ct_only": Code("CT-ONLY", PRIVATE_SCHEME, "CT only"),
    "cf_only": Code("CF-ONLY", PRIVATE_SCHEME, "Clinical features only"),
    "none": Code("NONE", PRIVATE_SCHEME, "No fusion"),
}
CT_USED: Final = Code("CT-USED", PRIVATE_SCHEME, "CT model used")
CF_USED: Final = Code("CF-USED", PRIVATE_SCHEME, "Clinical-feature model used")
CT_REASON: Final = Code("CT-REASON", PRIVATE_SCHEME, "Why the CT model was not used")
CF_REASON: Final = Code("CF-REASON", PRIVATE_SCHEME, "Why the clinical-feature model was not used")
PROBABILITY_CODES: Final[dict[str, Code]] = {
    "control": Code("P-CONTROL", PRIVATE_SCHEME, "Probability of control"),
    "type1": Code("P-TYPE1", PRIVATE_SCHEME, "Probability of Type I"),
    "type2": Code("P-TYPE2", PRIVATE_SCHEME, "Probability of Type II"),
}
MODEL_CODES: Final[dict[str, Code]] = {
    "ct": Code("CT-MODEL", PRIVATE_SCHEME, "HUST-19 CT model"),
    "cf": Code("CF-MODEL", PRIVATE_SCHEME, "HUST-19 clinical-feature model"),
    "fused": Code("FUSED", PRIVATE_SCHEME, "HUST-19 fused CT and clinical features"),
}

# --- standard codes -------------------------------------------------------------------------
COVID19: Final = Code("840539006", "SCT", "COVID-19")
"""SNOMED CT 840539006 'Disease caused by severe acute respiratory syndrome coronavirus 2'."""
CT_OF_CHEST: Final = Code("169069000", "SCT", "CT of chest")
YES: Final = codes.SCT.Yes
NO: Final = codes.SCT.No
PROBABILITY_UNIT: Final = Code("{probability}", "UCUM", "probability")
"""A UCUM annotation: dimensionless (= 1), annotated as a probability in [0, 1]."""

# --- fixed attributes of the SR -------------------------------------------------------------
SR_SERIES_NUMBER: Final = 9190
SR_INSTANCE_NUMBER: Final = 1
SR_SERIES_DESCRIPTION: Final = "HUST-19 COVID-19 triage (AI, unverified)"
SCORE_DECIMALS: Final = 6
"""Scores are written rounded to this many decimals (a DS holds 16 characters)."""
DEFAULT_ALGORITHM_NAME: Final = "HUST-19"
DEFAULT_MANUFACTURER: Final = "HUST-19 edge triage agent"


@dataclass(frozen=True)
class SrSource:
    """What the SR copies from the source series: patient and study attributes of one of its
    instances, the series UID, and the evidence slices as (SOP Class UID, SOP Instance UID).

    Validates in its constructor: an invalid study or series UID (the UUID-style UIDs of some
    public data sets) or an invalid evidence UID raises :class:`DicomInputError` naming the
    field, because an SR cannot be placed in a study that has no valid UID.
    """

    study_uid: str
    series_uid: str
    evidence: tuple[tuple[str, str], ...]
    patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_id: str = ""
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    referring_physician_name: str = ""
    specific_character_set: str | tuple[str, ...] | None = None
    frame_of_reference_uid: str | None = None
    source_instance: tuple[str, str] | None = field(default=None)
    """(SOP Class UID, SOP Instance UID) of the header the attributes came from: the evidence
    when ``evidence`` is empty (e.g. a CF-only result)."""

    def __post_init__(self) -> None:
        where = f"study {self.study_uid!r} series {self.series_uid!r}"
        for name, uid in (("StudyInstanceUID", self.study_uid),
                          ("SeriesInstanceUID", self.series_uid)):
            if not is_valid_uid(uid):
                raise DicomInputError(f"{name} {uid!r} is not a valid DICOM UID: no SR can be "
                                      f"written into that study ({where})")
        refs = list(self.evidence) + ([self.source_instance] if self.source_instance else [])
        for sop_class_uid, sop_instance_uid in refs:
            for name, uid in (("SOPClassUID", sop_class_uid),
                              ("SOPInstanceUID", sop_instance_uid)):
                if not is_valid_uid(uid):
                    raise DicomInputError(f"evidence {name} {uid!r} is not a valid DICOM UID "
                                          f"({where})")
        if self.frame_of_reference_uid and not is_valid_uid(self.frame_of_reference_uid):
            raise DicomInputError(f"FrameOfReferenceUID {self.frame_of_reference_uid!r} is not "
                                  f"a valid DICOM UID ({where})")
        if not self.evidence and self.source_instance is None:
            raise InputError(f"no evidence instance for the SR ({where})")

    @classmethod
    def from_dataset(cls, header: Dataset, evidence_uids: Sequence[str]) -> SrSource:
        """Take the attributes from ``header`` (any instance of the source series, read with
        ``stop_before_pixels=True``) and the evidence slices by SOP Instance UID; they share the
        header's SOP Class (one series, one SOP class). Raises :class:`DicomInputError`."""
        def text(keyword: str) -> str:
            value = header.get(keyword)
            return "" if value is None else str(value)

        sop_class_uid = text("SOPClassUID")
        charset = header.get("SpecificCharacterSet")
        if charset is not None and not isinstance(charset, str):
            charset = tuple(str(c) for c in charset)
        header_uid = text("SOPInstanceUID")
        return cls(
            study_uid=text("StudyInstanceUID"),
            series_uid=text("SeriesInstanceUID"),
            evidence=tuple((sop_class_uid, uid) for uid in evidence_uids),
            patient_id=text("PatientID"),
            patient_name=text("PatientName"),
            patient_birth_date=text("PatientBirthDate"),
            patient_sex=text("PatientSex"),
            study_id=text("StudyID"),
            study_date=text("StudyDate"),
            study_time=text("StudyTime"),
            accession_number=text("AccessionNumber"),
            referring_physician_name=text("ReferringPhysicianName"),
            specific_character_set=charset,
            frame_of_reference_uid=text("FrameOfReferenceUID") or None,
            source_instance=(sop_class_uid, header_uid) if header_uid else None,
        )

    def _instance(self, sop_class_uid: str, sop_instance_uid: str) -> Dataset:
        """A header-only dataset of one source instance, as highdicom takes evidence."""
        ds = Dataset()
        if self.specific_character_set is not None:
            ds.SpecificCharacterSet = list(self.specific_character_set) if isinstance(
                self.specific_character_set, tuple) else self.specific_character_set
        ds.PatientID = self.patient_id
        ds.PatientName = self.patient_name
        ds.PatientBirthDate = self.patient_birth_date
        ds.PatientSex = self.patient_sex
        ds.StudyInstanceUID = self.study_uid
        ds.StudyID = self.study_id
        ds.StudyDate = self.study_date
        ds.StudyTime = self.study_time
        ds.AccessionNumber = self.accession_number
        ds.ReferringPhysicianName = self.referring_physician_name
        ds.SeriesInstanceUID = self.series_uid
        ds.SOPClassUID = sop_class_uid
        ds.SOPInstanceUID = sop_instance_uid
        ds.Modality = "CT"
        if self.frame_of_reference_uid:
            ds.FrameOfReferenceUID = self.frame_of_reference_uid
        return ds

    def evidence_datasets(self) -> list[Dataset]:
        """The evidence instances (or the source instance when there is none) as datasets."""
        refs = list(self.evidence) or ([self.source_instance] if self.source_instance else [])
        return [self._instance(c, i) for c, i in refs]


def _probabilities(modality: str, scores: ClassScores) -> list[Measurement]:
    return [
        Measurement(name=PROBABILITY_CODES[cls], value=round(getattr(scores, cls),
                                                             SCORE_DECIMALS),
                    unit=PROBABILITY_UNIT, method=MODEL_CODES[modality])
        for cls in ("control", "type1", "type2")
    ]


def _check_result(result: TriageResult, source: SrSource) -> Flag:
    where = f"study {result.study_uid} series {result.series_uid}"
    if result.status != "triaged" or result.flag is None:
        raise InputError(f"result is {result.status!r} without a flag: no SR to write ({where})")
    if result.threshold is None or result.availability is None:
        raise InputError(f"triaged result lacks its threshold or availability ({where})")
    if (result.study_uid, result.series_uid) != (source.study_uid, source.series_uid):
        raise InputError(f"result ({where}) and SR source (study {source.study_uid} series "
                         f"{source.series_uid}) are different series")
    evidence_uids = [uid for _, uid in source.evidence]
    if result.top_slices and evidence_uids != list(result.top_slices):
        raise InputError(f"SR evidence {evidence_uids} differs from the result's top slices "
                         f"{result.top_slices} ({where})")
    return result.flag


def build_sr(result: TriageResult, source: SrSource, *, algorithm_version: str,
             algorithm_name: str = DEFAULT_ALGORITHM_NAME,
             manufacturer: str = DEFAULT_MANUFACTURER,
             institution_name: str | None = None,
             institutional_department_name: str | None = None,
             device_name: str | None = None) -> Dataset:
    """Build the TID 1500 Comprehensive SR of ``result`` in the study of ``source``.

    ``algorithm_version`` is the model version the SR UIDs derive from (the same series and
    version always give the same SOP Instance UID). ``device_name`` (e.g. the agent's AE
    title) names the device observer; it defaults to ``algorithm_name``.

    Raises :class:`InputError` (or its :class:`DicomInputError`) naming the field when the
    result has no flag or does not match the source. Returns a dataset ready to write as
    Part-10 (``ds.save_as(path, enforce_file_format=True)``) or to send by C-STORE.
    """
    flag = _check_result(result, source)
    threshold = result.threshold
    availability = result.availability
    assert threshold is not None and availability is not None  # checked above
    where = f"study {source.study_uid} series {source.series_uid}"

    series_uid = sr_series_uid(source.study_uid, algorithm_version)
    instance_uid = sr_instance_uid(source.series_uid, algorithm_version)
    parameters = [f"threshold={threshold}", f"fusion={availability.fusion}"]
    parameters += [f"{name}={version}" for name, version in sorted(result.model_versions.items())]
    algorithm = AlgorithmIdentification(name=algorithm_name, version=algorithm_version,
                                        parameters=parameters, manufacturer=manufacturer)

    evaluations = [
        QualitativeEvaluation(TRIAGE_CATEGORY, CATEGORY_CODES[flag]),
        QualitativeEvaluation(THRESHOLD, THRESHOLD_CODES[threshold]),
        QualitativeEvaluation(FUSION, FUSION_CODES[availability.fusion]),
        QualitativeEvaluation(CT_USED, YES if availability.ct else NO),
        QualitativeEvaluation(CF_USED, YES if availability.cf else NO),
    ]
    measurements: list[Measurement] = []
    for modality in ("ct", "cf", "fused"):
        scores = getattr(result.scores, modality)
        if scores is not None:
            measurements += _probabilities(modality, scores)

    evidence = source.evidence_datasets()
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=derive_uid("sr-tracking", source.series_uid, algorithm_version),
            identifier=f"{algorithm_name} triage"),
        finding_type=COVID19,
        finding_sites=[hd.sr.FindingSite(codes.SCT.Lung)],
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[SourceImageForMeasurementGroup(ds.SOPClassUID, ds.SOPInstanceUID)
                       for ds in evidence],
    )
    group_items = group[0].ContentSequence
    for used, reason, concept in ((availability.ct, availability.ct_reason, CT_REASON),
                                  (availability.cf, availability.cf_reason, CF_REASON)):
        if not used and reason:
            group_items.append(TextContentItem(
                name=concept, value=reason[:1024],
                relationship_type=RelationshipTypeValues.CONTAINS))

    observer = ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=derive_uid("device", algorithm_name, algorithm_version),
            name=device_name or algorithm_name, manufacturer_name=manufacturer,
            model_name=algorithm_name))
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=CT_OF_CHEST,
        imaging_measurements=[group],
    )

    ready = result.timings.result_ready.astimezone(UTC)
    try:
        with warnings.catch_warnings():
            # The patient name is copied from the source images as it is; highdicom's advice on
            # composing person names does not apply to a copy.
            warnings.filterwarnings("ignore", message=".*intended person name",
                                    category=UserWarning)
            sr = ComprehensiveSR(
                evidence=evidence,
                content=report,
                series_instance_uid=series_uid,
                series_number=SR_SERIES_NUMBER,
                sop_instance_uid=instance_uid,
                instance_number=SR_INSTANCE_NUMBER,
                manufacturer=manufacturer,
                is_complete=True,
                is_final=False,
                is_verified=False,
                institution_name=institution_name,
                institutional_department_name=institutional_department_name,
                transfer_syntax_uid=ExplicitVRLittleEndian,
                series_description=SR_SERIES_DESCRIPTION,
                software_versions=algorithm_version,
                manufacturer_model_name=algorithm_name,
                content_date=ready.date(),
                content_time=ready.time(),
                series_date=ready.date(),
                series_time=ready.time(),
                coding_schemes=[CodingSchemeIdentificationItem(
                    designator=PRIVATE_SCHEME, name=PRIVATE_SCHEME_NAME,
                    responsible_organization=manufacturer)],
            )
    except (ValueError, TypeError) as exc:
        raise DicomInputError(f"SR cannot be built ({where}): {exc}") from exc
    # highdicom stamps the creation time with now(); use the result time (determinism).
    sr.InstanceCreationDate = DA(ready.date())
    sr.InstanceCreationTime = TM(ready.time())
    sr.TimezoneOffsetFromUTC = "+0000"
    for equipment in sr.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in equipment:
            equipment.ContributionDateTime = ready.strftime("%Y%m%d%H%M%S.%f")
    logger.info("built SR %s for study %s series %s: %s (%s threshold)", instance_uid,
                source.study_uid, source.series_uid, flag, threshold)
    return sr
