"""Overlay pictures of the lung segmentation and the opacities on every shared series.

Usage: ``python bench/qct_overlays.py [--data ../shared/data] [--out docs/images]``; writes
``qct-<series>.png`` (twelve evenly spaced slices in the lung window: right lung green, left
lung cyan, opacities red, the readers' infected slices marked in the title) and prints JSON
naming the files and each series' measurements, so a person can look and agree.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

# The repository first: run as `python bench/<name>.py`, this folder's engines.py (the network
# benchmark) would otherwise shadow the engines package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines import ct_analysis, quantitative
from engines.evidence import EvidenceModel
from engines.lung_segmentation import LEFT, RIGHT, segment
from engines.training.series_data import LabelledSeries, load_volume, shared_series

PANELS = 12
SHARED = ("P002", "cap002", "normal001")


def draw(item: LabelledSeries, out: Path, model: EvidenceModel) -> dict[str, object]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    volume, labels = load_volume(item)
    seg = segment(volume.hu, volume.pixel_mm, volume.slice_mm,
                  left_at_higher_columns=volume.left_at_higher_columns)
    analysis = ct_analysis.analyse(volume, model, series_uid=item.name)
    sides = seg.full(np)
    _, opacity, _ = quantitative.opacities(volume.hu, sides > 0, min(volume.pixel_mm))
    with_lung = np.flatnonzero(analysis.quant.lung_px > 0)
    picks = with_lung[np.linspace(0, len(with_lung) - 1, PANELS).astype(int)]
    fig, axes = plt.subplots(3, 4, figsize=(13, 10.5), dpi=55)
    for ax, i in zip(axes.ravel(), picks, strict=True):
        grey = np.clip((volume.hu[i].astype(np.float32) + 1350.0) / 1500.0, 0, 1)
        ax.imshow(grey, cmap="gray")
        for value, colour in ((RIGHT, "lime"), (LEFT, "cyan")):
            if (sides[i] == value).any():
                ax.contour(sides[i] == value, levels=[0.5], colors=colour, linewidths=0.8)
        ax.imshow(np.ma.masked_where(~opacity[i], opacity[i]), cmap="autumn", alpha=0.55)
        marked = " reader: infected" if labels[i] == 1 else ""
        ax.set_title(f"{item.name} slice {i} evidence {analysis.evidence[i]:.2f}{marked}",
                     fontsize=9)
        ax.axis("off")
    q = analysis.quant.lungs
    volume_text = "n/a" if q is None or q.volume_ml is None else f"{q.volume_ml:.0f}"
    involvement = analysis.involvement_percent
    involvement_text = ("not measured: " + (analysis.reason or "") if involvement is None
                        else f"{involvement:.2f} %")
    fig.suptitle(f"{item.name}: lungs {volume_text} ml, involvement {involvement_text}; right "
                 "lung green, left lung cyan, opacities red", fontsize=11)
    fig.tight_layout()
    path = out / f"qct-{item.name}.png"
    fig.savefig(path, format="png")
    plt.close(fig)
    return {"file": str(path), **analysis.summary()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = EvidenceModel.load()
    items = [*shared_series(args.data, SHARED),
             LabelledSeries("lung-pet-ct-dx", args.data / "lung-pet-ct-dx" / "Lung_Dx-A0002-B40f",
                            True)]
    print(json.dumps([draw(item, args.out, model) for item in items], indent=1))


if __name__ == "__main__":
    main()
