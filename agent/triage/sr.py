"""The DICOM Structured Report that carries a triage result back to the PACS.

One Comprehensive SR (TID 1500 Measurement Report, built with highdicom) per triaged series, in
the study of that series, in a series of its own. Its content tree::

    Imaging Measurement Report (TID 1500)
    ├── language, device observer (the algorithm), procedure reported: CT of chest
    └── Imaging Measurements
        ├── Measurement Group (TID 1501), tracking id, finding COVID-19, site lung, algorithm
        │   ├── CODE  HUST-19 triage category = control | Type I | Type II
        │   ├── CODE  decision threshold = general | sensitive
        │   ├── CODE  fusion = rule | PLR | CT only | CF only;  CT used;  CF used (yes/no)
        │   ├── CODE  CT scores from = quantitative CT | patient CNN
        │   ├── TEXT  why a modality was not used (only when it was not)
        │   ├── NUM   probability of control / Type I / Type II, method = CT | patient CNN |
        │   │         CF | fused (only for the models that produced scores)
        │   └── IMAGE source images: the evidence slices
        └── Measurement Group "quantitative lung CT", one per lung region (both lungs, right
            lung, left lung; finding site accordingly), when the series was measured
            ├── NUM   lung volume (mL), mean attenuation ([hnsf'U]), lung involvement (%),
            │         ground glass (%), consolidation (%), well aerated (%): each only when the
            │         series gave it
            ├── CODE  CT severity category = CT-0..CT-4 (both lungs)
            └── UIDREF source series (the CT series measured)

Codes: SNOMED CT and DICOM where the standard has the concept (COVID-19, lung, right and left
lung, CT of chest, yes/no, volume, attenuation coefficient, mean, Series Instance UID); the
HUST-19 categories, scores, patterns and severity categories use the private coding scheme
``99HUST19``, declared in the Coding Scheme Identification Sequence. Units are UCUM.

Determinism: the SR series and SOP Instance UIDs come from :mod:`agent.triage.uids` (the source
series, the model version and a digest of the content), and every date/time in the object is the
result's ``result_ready`` time, so the same :class:`TriageResult` and :class:`SrSource` give a
byte-identical dataset. A result that replaces an earlier one names that SR in the Predecessor
Documents Sequence.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any, Final

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
    UIDRefContentItem,
)
from highdicom.sr.enum import RelationshipTypeValues
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM

from agent.triage.uids import derive_uid, is_valid_uid, sr_instance_uid, sr_series_uid
from schemas.errors import DicomInputError, InputError
from schemas.messages import ClassScores, Flag, LungMeasurements, QuantitativeCt, TriageResult

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
    "rule": Code("RULE", PRIVATE_SCHEME, "CF decides COVID-19, CT decides severity"),
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
CT_SOURCE: Final = Code("CT-SOURCE", PRIVATE_SCHEME, "CT scores from")
CT_SOURCE_CODES: Final[dict[str, Code]] = {
    "quantitative": Code("QCT", PRIVATE_SCHEME, "Quantitative lung CT"),
    "patient_cnn": Code("PATIENT-CNN", PRIVATE_SCHEME, "HUST-19 patient CNN"),
}
MODEL_CODES: Final[dict[str, Code]] = {
    "ct": Code("CT-MODEL", PRIVATE_SCHEME, "HUST-19 CT model"),
    "ct_cnn": Code("PATIENT-CNN", PRIVATE_SCHEME, "HUST-19 patient CNN"),
    "cf": Code("CF-MODEL", PRIVATE_SCHEME, "HUST-19 clinical-feature model"),
    "fused": Code("FUSED", PRIVATE_SCHEME, "HUST-19 fused CT and clinical features"),
}

QUANTITATIVE_CT: Final = Code("QCT", PRIVATE_SCHEME, "Quantitative lung CT")
INVOLVEMENT: Final = Code("LUNG-INVOLVEMENT", PRIVATE_SCHEME,
                          "Lung involvement (ground glass and consolidation)")
PATTERN_CODES: Final[dict[str, Code]] = {
    "ground_glass_percent": Code("GGO-SHARE", PRIVATE_SCHEME, "Ground glass share of lung"),
    "consolidation_percent": Code("CONS-SHARE", PRIVATE_SCHEME, "Consolidation share of lung"),
    "well_aerated_percent": Code("WAL-SHARE", PRIVATE_SCHEME, "Well-aerated share of lung"),
}
SEVERITY: Final = Code("CT-SEVERITY", PRIVATE_SCHEME, "CT severity category")
SEVERITY_CODES: Final[dict[str, Code]] = {
    f"CT-{k}": Code(f"CT-{k}", PRIVATE_SCHEME, meaning) for k, meaning in enumerate((
        "CT-0: no signs of pneumonia", "CT-1: involvement below 25 %",
        "CT-2: involvement 25-50 %", "CT-3: involvement 50-75 %",
        "CT-4: involvement 75 % or more"))
}

# --- standard codes -------------------------------------------------------------------------
COVID19: Final = Code("840539006", "SCT", "COVID-19")
"""SNOMED CT 840539006 'Disease caused by severe acute respiratory syndrome coronavirus 2'."""
CT_OF_CHEST: Final = Code("169069000", "SCT", "CT of chest")
YES: Final = codes.SCT.Yes
NO: Final = codes.SCT.No
PROBABILITY_UNIT: Final = Code("{probability}", "UCUM", "probability")
"""A UCUM annotation: dimensionless (= 1), annotated as a probability in [0, 1]."""
RIGHT_LUNG: Final = Code("3341006", "SCT", "Right lung")
LEFT_LUNG: Final = Code("44029006", "SCT", "Left lung")
VOLUME: Final = Code("118565006", "SCT", "Volume")
MEAN: Final = Code("373098007", "SCT", "Mean")
ATTENUATION: Final = Code("112031", "DCM", "Attenuation Coefficient")
SOURCE_SERIES: Final = Code("112002", "DCM", "Series Instance UID")
MILLILITRE: Final = Code("mL", "UCUM", "milliliter")
PERCENT: Final = Code("%", "UCUM", "percent")
HOUNSFIELD: Final = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
MEASURE_DECIMALS: Final = 3

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


def _predecessor(study_uid: str, series_uid: str, instance_uid: str) -> Dataset:
    """The header of the SR a new one replaces, as highdicom takes previous versions."""
    ds = Dataset()
    ds.SOPClassUID = ComprehensiveSRStorage
    ds.SOPInstanceUID = instance_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    return ds


def _probabilities(modality: str, scores: ClassScores) -> list[Measurement]:
    return [
        Measurement(name=PROBABILITY_CODES[cls], value=round(getattr(scores, cls),
                                                             SCORE_DECIMALS),
                    unit=PROBABILITY_UNIT, method=MODEL_CODES[modality])
        for cls in ("control", "type1", "type2")
    ]


def _number(name: Code, value: float, unit: Code, *, method: Code | None = None,
            derivation: Code | None = None) -> Measurement:
    return Measurement(name=name, value=round(float(value), MEASURE_DECIMALS), unit=unit,
                       method=method, derivation=derivation)


def _lung_numbers(figures: LungMeasurements) -> list[Measurement]:
    """The NUM items of one lung region, only those the series gave."""
    out = []
    if figures.volume_ml is not None:
        out.append(_number(VOLUME, figures.volume_ml, MILLILITRE))
    if figures.mean_hu is not None:
        out.append(_number(ATTENUATION, figures.mean_hu, HOUNSFIELD, derivation=MEAN))
    if figures.involvement_percent is not None:
        out.append(_number(INVOLVEMENT, figures.involvement_percent, PERCENT))
    for key, concept in PATTERN_CODES.items():
        value = getattr(figures, key)
        if value is not None:
            out.append(_number(concept, value, PERCENT))
    return out


def _quantitative_groups(quant: QuantitativeCt, source: SrSource, algorithm: Any,
                         algorithm_version: str,
                         evidence: list[Dataset]) -> list[MeasurementsAndQualitativeEvaluations]:
    """One measurement group per lung region that has figures (both lungs first)."""
    groups = []
    for region, site, figures in (("lungs", codes.SCT.Lung, quant.lungs),
                                  ("right", RIGHT_LUNG, quant.right),
                                  ("left", LEFT_LUNG, quant.left)):
        if figures is None:
            continue
        numbers = _lung_numbers(figures)
        evaluations = []
        if region == "lungs" and quant.severity is not None:
            evaluations.append(QualitativeEvaluation(SEVERITY, SEVERITY_CODES[quant.severity]))
        if not numbers and not evaluations:
            continue
        group = MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=derive_uid("sr-tracking-qct", source.series_uid, region, algorithm_version),
                identifier=f"quantitative lung CT, {region}"),
            finding_type=QUANTITATIVE_CT, finding_sites=[hd.sr.FindingSite(site)],
            algorithm_id=algorithm, measurements=numbers or None,
            qualitative_evaluations=evaluations or None,
            source_images=[SourceImageForMeasurementGroup(ds.SOPClassUID, ds.SOPInstanceUID)
                           for ds in evidence])
        group[0].ContentSequence.append(UIDRefContentItem(
            name=SOURCE_SERIES, value=source.series_uid,
            relationship_type=RelationshipTypeValues.CONTAINS))
        groups.append(group)
    return groups


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
             device_name: str | None = None,
             predecessor: tuple[str, str] | None = None) -> Dataset:
    """Build the TID 1500 Comprehensive SR of ``result`` in the study of ``source``.

    The SOP Instance UID is the result's ``sr_sop_instance_uid`` (the worker derives it from
    the series, the model version and the content); without one it is derived from the series
    and ``algorithm_version``. ``device_name`` (e.g. the agent's AE title) names the device
    observer; it defaults to ``algorithm_name``. ``predecessor`` is the (Series, SOP Instance)
    UID of the SR this one replaces, written as its Predecessor Documents Sequence.

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
    instance_uid = result.sr_sop_instance_uid or sr_instance_uid(source.series_uid,
                                                                  algorithm_version)
    if not is_valid_uid(instance_uid):
        raise InputError(f"SR SOP Instance UID {instance_uid!r} is not a valid UID ({where})")
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
    if availability.ct_source is not None:
        evaluations.append(QualitativeEvaluation(CT_SOURCE,
                                                 CT_SOURCE_CODES[availability.ct_source]))
    measurements: list[Measurement] = []
    for modality in ("ct", "ct_cnn", "cf", "fused"):
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

    groups = [group]
    if result.quantitative_ct is not None:
        groups += _quantitative_groups(result.quantitative_ct, source, algorithm,
                                       algorithm_version, evidence)
    observer = ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=derive_uid("device", algorithm_name, algorithm_version),
            name=device_name or algorithm_name, manufacturer_name=manufacturer,
            model_name=algorithm_name))
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=CT_OF_CHEST,
        imaging_measurements=groups,
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
                previous_versions=None if predecessor is None else [
                    _predecessor(source.study_uid, *predecessor)],
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
