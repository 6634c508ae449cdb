"""``hust19 train slice`` from a site's folder: the labelled slices of the training series, a
held-out series scored after training with a report, plots and a card; bad flags exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from engines.training.series_data import site_series
from engines.training.slice import LABEL_NCT, LABEL_PCT, site_sources
from tests.fixtures.site import RUNS, Site


def test_site_sources_take_the_readers_labels_and_normal_series_as_negative(
        tiny_site: Site) -> None:
    items = site_series(tiny_site.series_dir, tiny_site.labels, tiny_site.slice_labels)
    sources = site_sources(items)
    per_series = {name: [s for s in sources if s.group == f"series:{name}"] for name in RUNS}
    assert {name: len(v) for name, v in per_series.items()} == {
        name: last - first for name, (first, last, *_) in RUNS.items()}
    assert all(s.source_label == LABEL_NCT for s in per_series["normal001"])
    marked = [s for s in per_series["P002"] if s.radiologist_marked]
    assert marked and all(s.source_label == LABEL_PCT for s in marked)


def test_train_slice_with_a_held_out_site_series(tiny_site: Site, tmp_path: Path) -> None:
    out = tmp_path / "slice"
    args = [sys.executable, "-m", "agent.cli", "train", "slice", "--series-dir",
            str(tiny_site.series_dir), "--labels", str(tiny_site.labels), "--slice-labels",
            str(tiny_site.slice_labels), "--epochs", "1", "--out", str(out), "--no-progress"]
    bad = subprocess.run([*args, "--holdout", "nosuch"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "nosuch" in bad.stderr and "Traceback" not in bad.stderr
    proc = subprocess.run([*args, "--holdout", "cap002"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "slice.json").read_text())
    assert meta["training"]["series"] == ["P002", "normal001"]
    report = json.loads((out / "holdout-report.json").read_text())
    assert report["held_out"] == ["cap002"]
    assert report["pct_vs_rest"]["cap002"]["n"] == RUNS["cap002"][1] - RUNS["cap002"][0]
    assert "Held-out series" in (out / "card.md").read_text()
    for png in ("holdout-roc.png", "holdout-confusion.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")
