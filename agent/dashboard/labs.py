"""The patient page's lab table: values as a result carries them (``lab_values``, the inputs of
the clinical-feature model) or as the LIS gives them now, named and ordered by the catalogue
(``schemas/clinical_features.json``).

A value is shown in the unit it came in (the catalogue's when it came without one); its
reference range is the one printed with the result, else the catalogue's normal range (only
for a value in the catalogue's unit), and the row says which. A value is marked low or high
only when that is certain: a censored value ("<0.13") is below a range whose lower bound is at
least its bound, and never known to be above one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from schemas.features import Feature, catalogue

RangeSource = Literal["printed", "catalogue", "none"]
Direction = Literal["low", "high"]
DEMOGRAPHIC_KINDS = frozenset({"demographic", "binary", "vital"})


class LabLike(Protocol):
    """What :class:`schemas.messages.LabResult` and :class:`schemas.features.LabValue` share."""

    @property
    def code(self) -> str: ...
    @property
    def value(self) -> float | None: ...
    @property
    def unit(self) -> str | None: ...
    @property
    def qualifier(self) -> str: ...
    @property
    def low(self) -> float | None: ...
    @property
    def high(self) -> float | None: ...
    @property
    def collected_at(self) -> str | None: ...


@dataclass(frozen=True)
class LabRow:
    """One row of the lab table, formatted for the page."""

    code: str
    name: str
    panel: str
    value: str
    unit: str
    catalogue_unit: str | None
    """The catalogue's unit when the value came in another one, else ``None``."""
    range_text: str
    range_source: RangeSource
    direction: Direction | None
    collected: str


def number(value: float | None) -> str:
    """A lab number as a report prints it: integral values without decimals, others with up to
    six significant digits."""
    if value is None:
        return "—"
    if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}"


def range_text(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f"{number(low)}\u2013{number(high)}"
    if high is not None:
        return f"≤ {number(high)}"
    if low is not None:
        return f"≥ {number(low)}"
    return "—"


def direction(value: float | None, qualifier: str, low: float | None,
              high: float | None) -> Direction | None:
    """Below or above ``[low, high]`` where certain (module docstring), else ``None``."""
    if value is None:
        return None
    if qualifier == "<":  # the true value is below ``value``
        return "low" if low is not None and value <= low else None
    if qualifier == ">":
        return "high" if high is not None and value >= high else None
    if low is not None and value < low:
        return "low"
    if high is not None and value > high:
        return "high"
    return None


def collected(text: str | None, kind: str | None) -> str:
    """The collection time for the page: local time when it has a zone, as given otherwise."""
    if not text:
        return "—" if kind in DEMOGRAPHIC_KINDS else "undated"
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return text[:16]
    if when.tzinfo is not None:
        when = when.astimezone()
    return when.strftime("%Y-%m-%d %H:%M")


def lab_rows(values: Iterable[LabLike]) -> list[LabRow]:
    """The table of ``values``, in the catalogue's order (codes it does not know last)."""
    features = catalogue()
    order = {f.code: i for i, f in enumerate(features)}
    by_code: dict[str, Feature] = {f.code: f for f in features}
    rows = []
    for v in sorted(values, key=lambda v: (order.get(v.code, len(order)), v.code)):
        f = by_code.get(v.code)
        cat_unit = f.unit if f is not None else ""
        unit = v.unit or cat_unit
        printed = v.low is not None or v.high is not None
        low, high = (v.low, v.high) if printed else (
            (f.normal_low, f.normal_high) if f is not None and unit == cat_unit
            else (None, None))
        source: RangeSource = "printed" if printed else (
            "catalogue" if low is not None or high is not None else "none")
        rows.append(LabRow(
            code=v.code, name=f.name if f is not None else v.code,
            panel=f.panel if f is not None else "",
            value=f"{v.qualifier}{number(v.value)}" if v.value is not None else "—",
            unit=unit, catalogue_unit=cat_unit if v.unit and cat_unit and v.unit != cat_unit
            else None,
            range_text=range_text(low, high), range_source=source,
            direction=direction(v.value, v.qualifier, low, high),
            collected=collected(v.collected_at, f.kind if f is not None else None)))
    return rows
