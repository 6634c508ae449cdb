"""The worker's process-wide bound on the HU it keeps (``worker_volume_mib``): finished
series' volumes are released first, then the arriving series holding the most is not
measured and says why; what is left stays within the bound."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from agent.bus.embedded import EmbeddedBus
from agent.config import Settings
from agent.triage.worker import MIB, TriageModels, TriageWorker
from engines.triage import SliceInput, slice_input


@pytest.fixture(scope="module")
def slices(chest_series: Path) -> list[SliceInput]:
    """24 slices of P002 (512 x 512, 0.5 MiB of HU each)."""
    files = sorted((chest_series / "P002").iterdir())[40:64]
    return [slice_input(pydicom.dcmread(f), f.name, series_uid="P002") for f in files]


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[TriageWorker]:
    bus = EmbeddedBus(tmp_path / "bus")
    w = TriageWorker(Settings(data_dir=tmp_path / "data", worker_volume_mib=16), bus, pacs=None,
                     lis=None, models=TriageModels.load("cpu"))
    yield w
    w.ledger.close()
    bus.close()


def _held(worker: TriageWorker) -> int:
    return sum(st.scorer.volume_bytes for st in [*worker._active.values(),
                                                 *worker._finished.values()])


def _arrive(worker: TriageWorker, series_uid: str, inputs: list[SliceInput]) -> None:
    st = worker._state(series_uid)
    st.pending = list(inputs)
    worker._score(st)


def test_past_the_bound_the_largest_arriving_series_is_not_measured(
        worker: TriageWorker, slices: list[SliceInput]) -> None:
    assert slices[0].hu is not None and slices[0].hu.nbytes == MIB // 2
    _arrive(worker, "1.2.1", slices[:20])  # 10 MiB
    _arrive(worker, "1.2.2", slices[:24])  # 12 MiB: 22 MiB in all, over 16
    first, second = worker._active["1.2.1"].scorer, worker._active["1.2.2"].scorer
    assert first.volume_bytes == 10 * MIB and second.volume_bytes == 0
    assert _held(worker) <= 16 * MIB
    reason = second.finish().reason
    assert reason is not None and "worker_volume_mib 16 MiB" in reason and "largest" in reason
    assert second.finish().cnn_proba is not None  # the CNN path still runs
    _arrive(worker, "1.2.2", slices[:2])  # more of it: still not measured, nothing kept
    assert second.volume_bytes == 0


def test_finished_volumes_are_released_before_an_arriving_series_is_dropped(
        worker: TriageWorker, slices: list[SliceInput]) -> None:
    _arrive(worker, "1.2.1", slices[:20])  # 10 MiB
    worker._finished["1.2.1"] = worker._active.pop("1.2.1")  # finished, kept for late ones
    _arrive(worker, "1.2.3", slices[:14])  # 7 MiB: 17 MiB in all
    assert worker._finished["1.2.1"].scorer.volume_bytes == 0
    arriving = worker._active["1.2.3"].scorer
    assert arriving.volume_bytes == 7 * MIB and _held(worker) <= 16 * MIB
    assert arriving.finish().analysis is not None  # measured
