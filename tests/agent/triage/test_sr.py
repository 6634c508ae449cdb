"""The triage SR, built from real source headers, validated with dcmtk ``dsrdump`` and read
back with highdicom."""

from __future__ import annotations

import functools
import subprocess
import warnings
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from highdicom.sr import MeasurementReport, RelationshipTypeValues, srread
from highdicom.sr.utils import find_content_items
from pydicom import Dataset

from agent.triage.sr import (
    CATEGORY_CODES,
    CF_REASON,
    MODEL_CODES,
    PRIVATE_SCHEME,
    PROBABILITY_CODES,
    THRESHOLD,
    THRESHOLD_CODES,
    TRIAGE_CATEGORY,
    SrSource,
    build_sr,
)
from agent.triage.uids import result_id, sr_instance_uid, sr_series_uid
from schemas.errors import DicomInputError, InputError
from schemas.messages import (
    Availability,
    ClassScores,
    Flag,
    ModalityScores,
    Timings,
    TriageResult,
)

VERSION = "0.1.0-test"
READY = datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


@functools.cache
def read_headers(series_dir: Path) -> list[Dataset]:
    """Headers of a series (no pixel data), in Instance Number order (read once per run; the
    callers do not modify them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # UUID-style UIDs of P002/cap002
        headers = [pydicom.dcmread(f, stop_before_pixels=True)
                   for f in sorted(series_dir.iterdir()) if f.suffix.lower() == ".dcm"]
    return sorted(headers, key=lambda h: int(h.get("InstanceNumber") or 0))


def source_from(series_dir: Path, n_evidence: int = 10) -> SrSource:
    """An SrSource like the worker builds: one header, ``n_evidence`` evenly spaced slices."""
    headers = read_headers(series_dir)
    step = max(1, len(headers) // n_evidence)
    top = [h.SOPInstanceUID for h in headers[::step][:n_evidence]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return SrSource.from_dataset(headers[0], top)


def make_result(source: SrSource, flag: Flag = "type1", *, cf: bool = False,
                ready: datetime = READY) -> TriageResult:
    ct = ClassScores(control=0.1234567891, type1=0.6543210987, type2=0.2222221122)
    cf_scores = ClassScores(control=0.3, type1=0.5, type2=0.2) if cf else None
    fused = ClassScores(control=0.2, type1=0.6, type2=0.2) if cf else ct
    return TriageResult(
        result_id=result_id(source.series_uid),
        status="triaged", study_uid=source.study_uid, series_uid=source.series_uid,
        flag=flag, flag_general=flag, threshold="general",
        scores=ModalityScores(ct=ct, cf=cf_scores, fused=fused),
        availability=Availability(ct=True, cf=cf, fusion="plr" if cf else "ct_only",
                                  cf_reason=None if cf else "patient not found in the LIS"),
        top_slices=[uid for _, uid in source.evidence],
        model_versions={"slice_cnn": "s1", "patient_cnn": "p1", "cf_dnn": "c1", "plr": "f1"},
        timings=Timings(result_ready=ready), instance_count=154)


@pytest.fixture(scope="module")
def normal_source(chest_series: Path) -> SrSource:
    return source_from(chest_series / "normal001")


@pytest.fixture(scope="module")
def pet_ct_source(shared_data: Path) -> SrSource:
    return source_from(shared_data / "lung-pet-ct-dx" / "Lung_Dx-A0002-B40f")


def dsrdump(path: Path, *extra: str) -> str:
    """``dsrdump`` in its default (strict) mode; fails the test on any error or warning."""
    proc = subprocess.run(["dsrdump", "+Pu", "+Pc", "+Pl", *extra, str(path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr
    return proc.stdout


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("which", ["normal", "pet_ct"])
def test_sr_passes_dsrdump_with_category_scores_and_evidence(
        which: str, normal_source: SrSource, pet_ct_source: SrSource, tmp_path: Path) -> None:
    source = normal_source if which == "normal" else pet_ct_source
    result = make_result(source, "type1", cf=True)
    path = save(build_sr(result, source, algorithm_version=VERSION), tmp_path / "sr.dcm")

    dump = dsrdump(path)
    assert "Comprehensive SR Document" in dump
    assert f'(TRIAGE,{PRIVATE_SCHEME},"HUST-19 triage category")=(TYPE1,{PRIVATE_SCHEME},' \
           in dump
    assert "(840539006,SCT,\"COVID-19\")" in dump
    assert '(GENERAL,99HUST19,"General threshold")' in dump
    assert '="0.654321"' in dump  # CT type1 score, rounded to 6 decimals
    assert 'Algorithm Version")="0.1.0-test"' in dump
    for _, uid in source.evidence:
        assert f'(CT image,"{uid}")' in dump
    # the evidence sequence names the source study, series and slices
    header = subprocess.run(["dcmdump", "+P", "0040,a375", "+P", "0020,000e", "+P", "0008,1155",
                             str(path)], capture_output=True, text=True, check=True).stdout
    assert source.series_uid in header
    assert all(uid in header for _, uid in source.evidence)


def test_sr_reads_back_with_highdicom(normal_source: SrSource, tmp_path: Path) -> None:
    result = make_result(normal_source, "type2", cf=True)
    path = save(build_sr(result, normal_source, algorithm_version=VERSION), tmp_path / "sr.dcm")
    sr = srread(path)

    assert sr.SOPInstanceUID == sr_instance_uid(normal_source.series_uid, VERSION)
    assert sr.SeriesInstanceUID == sr_series_uid(normal_source.study_uid, VERSION)
    assert sr.StudyInstanceUID == normal_source.study_uid  # same study as the source
    assert sr.PatientID == normal_source.patient_id == "99C628-ASAD"
    assert sr.Modality == "SR"
    evidence = sr.get_evidence(current_procedure_only=True)
    assert [(e[0], e[1], e[3], e[2]) for e in evidence] == [
        (normal_source.study_uid, normal_source.series_uid, c, i)
        for c, i in normal_source.evidence]

    report = sr.content
    assert isinstance(report, MeasurementReport)  # TID 1500 recognised on read
    (group,) = report.get_image_measurement_groups()
    (category,) = group.get_qualitative_evaluations(name=TRIAGE_CATEGORY)
    assert category.value == CATEGORY_CODES["type2"]
    (threshold,) = group.get_qualitative_evaluations(name=THRESHOLD)
    assert threshold.value == THRESHOLD_CODES["general"]
    assert group.finding_type is not None and group.finding_type.value == "840539006"
    assert [img.referenced_sop_instance_uid for img in group.source_images] == \
        [uid for _, uid in normal_source.evidence]
    algorithm = {item.name.meaning: item.value for item in find_content_items(
        group[0], relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD)
        if item.name.meaning.startswith("Algorithm") and item.ValueType == "TEXT"}
    assert algorithm["Algorithm Name"] == "HUST-19"
    assert algorithm["Algorithm Version"] == VERSION

    got: dict[tuple[str, str], float] = {}
    for cls, name in PROBABILITY_CODES.items():
        for measurement in group.get_measurements(name=name):
            assert measurement.method is not None
            got[(measurement.method.value, cls)] = float(measurement.value)
            assert measurement.unit.value == "{probability}"
    for modality in ("ct", "cf", "fused"):
        scores = getattr(result.scores, modality)
        for cls in ("control", "type1", "type2"):
            assert got[(MODEL_CODES[modality].value, cls)] == pytest.approx(
                getattr(scores, cls), abs=1e-6)
    assert len(got) == 9


def test_unavailable_modality_is_left_out_and_explained(normal_source: SrSource,
                                                        tmp_path: Path) -> None:
    result = make_result(normal_source, "control", cf=False)
    path = save(build_sr(result, normal_source, algorithm_version=VERSION), tmp_path / "sr.dcm")
    dump = dsrdump(path)
    assert "CF-MODEL" not in dump
    assert "CT-MODEL" in dump
    assert '(CF-USED,99HUST19,"Clinical-feature model used")=(373067005,SCT,"No")' in dump
    assert f'{CF_REASON.meaning}")="patient not found in the LIS"' in dump
    assert '(CONTROL,99HUST19,"Control (not COVID-19)")' in dump


def test_same_result_gives_identical_sr(chest_series: Path, normal_source: SrSource,
                                        tmp_path: Path) -> None:
    first = save(build_sr(make_result(normal_source), normal_source, algorithm_version=VERSION),
                 tmp_path / "a.dcm")
    again_source = source_from(chest_series / "normal001")  # built anew, as a redo would
    second = save(build_sr(make_result(again_source), again_source, algorithm_version=VERSION),
                  tmp_path / "b.dcm")
    assert first.read_bytes() == second.read_bytes()

    later = build_sr(make_result(normal_source, "type2", ready=datetime.now(UTC)),
                     normal_source, algorithm_version=VERSION)
    assert later.SOPInstanceUID == pydicom.dcmread(first).SOPInstanceUID  # reprocessing
    other_model = build_sr(make_result(normal_source), normal_source, algorithm_version="0.2")
    assert other_model.SOPInstanceUID != later.SOPInstanceUID


@pytest.mark.parametrize("series", ["P002", "cap002"])
def test_uuid_style_study_uid_is_an_input_error(chest_series: Path, series: str) -> None:
    with pytest.raises(DicomInputError, match="StudyInstanceUID") as info:
        source_from(chest_series / series)
    assert isinstance(info.value, InputError)


def test_empty_evidence_uid_is_an_input_error(chest_series: Path) -> None:
    header = read_headers(chest_series / "normal001")[0]
    with pytest.raises(DicomInputError, match="SOPInstanceUID"):
        SrSource.from_dataset(header, ["", header.SOPInstanceUID])


def test_result_without_top_slices_references_the_source_instance(
        chest_series: Path, tmp_path: Path) -> None:
    header = read_headers(chest_series / "normal001")[0]
    source = SrSource.from_dataset(header, [])
    result = make_result(source).model_copy(update={"top_slices": []})
    path = save(build_sr(result, source, algorithm_version=VERSION), tmp_path / "sr.dcm")
    assert f'(CT image,"{header.SOPInstanceUID}")' in dsrdump(path)


def test_unusable_results_are_refused(normal_source: SrSource) -> None:
    skipped = TriageResult(result_id="1.2", status="skipped", skip_reason="not CT",
                           study_uid=normal_source.study_uid,
                           series_uid=normal_source.series_uid, timings=Timings(result_ready=READY))
    with pytest.raises(InputError, match="skipped"):
        build_sr(skipped, normal_source, algorithm_version=VERSION)
    other_series = make_result(normal_source).model_copy(update={"series_uid": "1.2.3"})
    with pytest.raises(InputError, match="different series"):
        build_sr(other_series, normal_source, algorithm_version=VERSION)
    wrong_evidence = make_result(normal_source).model_copy(update={"top_slices": ["1.2.3"]})
    with pytest.raises(InputError, match="top slices"):
        build_sr(wrong_evidence, normal_source, algorithm_version=VERSION)


QUANT = {
    "method": "qct-1+ct-stage-1+evidence-test",
    "lungs": {"volume_ml": 4003.153, "mean_hu": -813.0, "well_aerated_percent": 84.5,
              "ground_glass_percent": 3.248, "consolidation_percent": 0.205,
              "involvement_percent": 3.453},
    "right": {"volume_ml": 2219.9, "mean_hu": -833.5, "well_aerated_percent": 88.2,
              "ground_glass_percent": 0.334, "consolidation_percent": 0.026,
              "involvement_percent": 0.36},
    "left": {"volume_ml": None, "mean_hu": -787.5, "well_aerated_percent": 79.9,
             "ground_glass_percent": 6.875, "consolidation_percent": 0.428,
             "involvement_percent": 7.303},
    "severity": "CT-1", "slices_with_lung": 117, "slice_spacing_mm": 2.0, "warnings": []}


def test_quantitative_ct_is_in_the_sr_as_numbers_with_ucum_units(
        normal_source: SrSource, tmp_path: Path) -> None:
    from schemas.messages import QuantitativeCt

    result = make_result(normal_source, "type1").model_copy(update={
        "quantitative_ct": QuantitativeCt.model_validate(QUANT)})
    path = save(build_sr(result, normal_source, algorithm_version=VERSION), tmp_path / "sr.dcm")
    dump = dsrdump(path)
    assert '(LUNG-INVOLVEMENT,99HUST19,"Lung involvement (ground glass and consolidation)")' \
           '="3.453" (%,UCUM,"percent")' in dump
    assert '(118565006,SCT,"Volume")="4003.153" (mL,UCUM,"milliliter")' in dump
    assert '="7.303" (%,UCUM,"percent")' in dump  # the left lung's involvement
    assert ('(112031,DCM,"Attenuation Coefficient")="-813.0" '
            '([hnsf\'U],UCUM,"Hounsfield unit")') in dump
    assert '(CT-SEVERITY,99HUST19,"CT severity category")=(CT-1,99HUST19,' in dump
    assert '(3341006,SCT,"Right lung")' in dump and '(44029006,SCT,"Left lung")' in dump
    assert dump.count('(118565006,SCT,"Volume")') == 2, "no volume where the series gave none"
    assert f'(112002,DCM,"Series Instance UID")="{normal_source.series_uid}"' in dump
    report = srread(path).content
    groups = report.get_image_measurement_groups()
    assert len(groups) == 4  # the triage group and one per lung region


def test_a_replacing_sr_names_its_predecessor(normal_source: SrSource, tmp_path: Path) -> None:
    old = build_sr(make_result(normal_source), normal_source, algorithm_version=VERSION)
    new_uid = "2.25.1234567"
    result = make_result(normal_source, "type2", cf=True).model_copy(update={
        "sr_sop_instance_uid": new_uid, "revision": 2,
        "supersedes_sr_sop_instance_uid": old.SOPInstanceUID})
    new = build_sr(result, normal_source, algorithm_version=VERSION,
                   predecessor=(old.SeriesInstanceUID, old.SOPInstanceUID))
    assert new.SOPInstanceUID == new_uid != old.SOPInstanceUID
    (study,) = new.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == normal_source.study_uid
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == old.SeriesInstanceUID
    (item,) = series.ReferencedSOPSequence
    assert item.ReferencedSOPInstanceUID == old.SOPInstanceUID
    dsrdump(save(new, tmp_path / "new.dcm"))
