"""The clinical-feature (CF) catalogue: every input of the CF network, with its panel, unit
and normal range, and the LIS test codes that map onto it.

Built from the iCTCF definitions (``feature_definitions.csv`` in the iCTCF data) by
``python -m schemas.features build DEFINITIONS.csv``, and shipped as
``schemas/clinical_features.json``. The paper's normalisation (Ning et al. 2020) is
F = (f - Min) / (Max - Min) over the normal range [Min, Max]; a missing value is 0.5; gender
and underlying diseases (Udis) are 0/1. Ranges printed by only an upper bound ("<15 mm/h")
take Min = 0. A test with no single range in the definitions (PCT: each hospital prints its
own) has ``normal_low``/``normal_high`` of ``None`` and relies on the range the LIS reports
with each result.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal

CATALOGUE_FILE = Path(__file__).with_name("clinical_features.json")
CATALOGUE_VERSION = "ictcf-1"

Kind = Literal["lab", "demographic", "vital", "binary"]

# Features that are not laboratory tests: the paper's demographic and clinical inputs.
NON_LAB: tuple[dict[str, object], ...] = (
    {"code": "AGE", "name": "Age", "panel": "Demographics", "unit": "a", "kind": "demographic",
     "normal_low": 0.0, "normal_high": 100.0},
    {"code": "GENDER", "name": "Gender (male = 1)", "panel": "Demographics", "unit": "",
     "kind": "binary", "normal_low": 0.0, "normal_high": 1.0},
    {"code": "TEMP", "name": "Body temperature", "panel": "Vital signs", "unit": "Cel",
     "kind": "vital", "normal_low": 36.0, "normal_high": 37.3},
    {"code": "UDIS", "name": "Underlying diseases (any = 1)", "panel": "Clinical history",
     "unit": "", "kind": "binary", "normal_low": 0.0, "normal_high": 1.0},
)


@dataclass(frozen=True)
class Feature:
    """One CF input. ``lis_codes`` are the test codes a LIS may use for it (the iCTCF code by
    default; a hospital's mapping adds its own in the LIS configuration)."""

    code: str
    name: str
    panel: str
    unit: str
    kind: Kind
    normal_low: float | None
    normal_high: float | None
    lis_codes: tuple[str, ...] = field(default_factory=tuple)

    def normalise(self, value: float | None, low: float | None = None,
                  high: float | None = None) -> float:
        """The paper's F = (f - Min) / (Max - Min); ``low``/``high`` override the catalogue
        range (a hospital's printed range for this result). Missing, or no range at all: 0.5.
        The result is not clipped: values far outside the range are signal."""
        if value is None:
            return 0.5
        if self.kind == "binary":
            return 1.0 if value else 0.0
        lo = low if low is not None else self.normal_low
        hi = high if high is not None else self.normal_high
        if hi is None:
            return 0.5
        lo = 0.0 if lo is None else lo
        if hi <= lo:
            return 0.5
        return (value - lo) / (hi - lo)


@cache
def catalogue() -> tuple[Feature, ...]:
    """The shipped catalogue, in the CF network's input order."""
    data = json.loads(CATALOGUE_FILE.read_text())
    return tuple(Feature(**{**f, "lis_codes": tuple(f["lis_codes"])}) for f in data["features"])


def by_code() -> dict[str, Feature]:
    """Catalogue features keyed by their code."""
    return {f.code: f for f in catalogue()}


def _opt_float(text: str) -> float | None:
    return float(text) if text.strip() else None


def build(definitions: Path) -> dict[str, object]:
    """Build the catalogue document from the iCTCF ``feature_definitions.csv``."""
    features: list[dict[str, object]] = [{**f, "lis_codes": [f["code"]]} for f in NON_LAB]
    with definitions.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            low, high = _opt_float(row["normal_low"]), _opt_float(row["normal_high"])
            features.append(asdict(Feature(
                code=row["code"], name=row["name"], panel=row["panel"], unit=row["unit"],
                kind="lab", normal_low=low, normal_high=high, lis_codes=(row["code"],))))
            features[-1]["lis_codes"] = [row["code"]]
    return {"version": CATALOGUE_VERSION, "source": "iCTCF feature_definitions.csv "
            "(Ning et al., Nat. Biomed. Eng. 2020)", "features": features}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "build":
        print("usage: python -m schemas.features build FEATURE_DEFINITIONS.csv", file=sys.stderr)
        return 2
    doc = build(Path(argv[1]))
    CATALOGUE_FILE.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"{CATALOGUE_FILE}: {len(doc['features'])} features")  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


@dataclass(frozen=True)
class LabValue:
    """One measured value as a LIS reports it, already mapped onto a catalogue code.

    ``value`` is the number (for a censored result such as "<0.13" the bound, with
    ``qualifier`` "<" or ">"); ``low``/``high`` the reference range printed with this result
    (hospital-specific; ``None`` where none was printed) in ``unit``.
    """

    code: str
    value: float | None
    unit: str | None = None
    qualifier: str = ""
    low: float | None = None
    high: float | None = None
    lis_code: str | None = None
    collected_at: str | None = None
