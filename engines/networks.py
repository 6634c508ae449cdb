"""The HUST-19 convolutional networks in PyTorch (training and ONNX export only).

Both networks have the paper's 13-layer shape: three blocks of two 3x3 convolutions
(64,64 / 32,32 / 16,16 filters, ReLU, 'same' padding) each followed by a 2x2 max-pool, then a
dense 64 -> dropout 0.5 -> dense 32 -> dropout 0.5 -> 3 outputs. The slice CNN takes one
200x200 channel (a lung-extracted slice scaled to [0, 1]) and predicts NiCT / pCT / nCT; the
patient CNN takes the 10 selected slices as 10 channels and predicts control / type1 / type2.

The runtime never imports this module (nor torch): it runs the exported ONNX files through
:mod:`engines.backends`. The export wraps the logits in a softmax so that the ONNX output is
the per-class probability.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path
from typing import Final

import torch
from torch import nn

IMAGE_SIZE: Final = 200
SLICE_CHANNELS: Final = 1
PATIENT_CHANNELS: Final = 10
N_CLASSES: Final = 3
SLICE_CLASSES: Final = ("NiCT", "pCT", "nCT")
PATIENT_CLASSES: Final = ("control", "type1", "type2")
SLICE_LR: Final = 0.001
PATIENT_LR: Final = 0.0007
BATCH_SIZE: Final = 64
DROPOUT: Final = 0.5
CONV_WIDTHS: Final = (64, 32, 16)
DENSE_WIDTHS: Final = (64, 32)
ONNX_OPSET: Final = 17
INPUT_NAME: Final = "image"
OUTPUT_NAME: Final = "proba"


class Hust19Cnn(nn.Module):
    """The paper's 13-layer CNN (6 conv + 3 pool + flatten + 3 dense) with ``channels`` inputs.

    ``forward`` returns logits; :class:`WithSoftmax` adds the softmax for export.
    """

    def __init__(self, channels: int, n_classes: int = N_CLASSES) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = channels
        for width in CONV_WIDTHS:
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU(inplace=True),
                       nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            cin = width
        self.features = nn.Sequential(*layers)
        side = IMAGE_SIZE // 2 ** len(CONV_WIDTHS)
        flat = CONV_WIDTHS[-1] * side * side
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, DENSE_WIDTHS[0]), nn.ReLU(inplace=True), nn.Dropout(DROPOUT),
            nn.Linear(DENSE_WIDTHS[0], DENSE_WIDTHS[1]), nn.ReLU(inplace=True),
            nn.Dropout(DROPOUT),
            nn.Linear(DENSE_WIDTHS[1], n_classes),
        )
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class WithSoftmax(nn.Module):
    """Logits -> probabilities; what the ONNX file computes."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


def slice_cnn() -> Hust19Cnn:
    """The slice CNN: 1x200x200 -> NiCT / pCT / nCT."""
    return Hust19Cnn(SLICE_CHANNELS)


def patient_cnn() -> Hust19Cnn:
    """The patient CNN: 10x200x200 (top-10 pCT slices in slice order) -> control/type1/type2."""
    return Hust19Cnn(PATIENT_CHANNELS)


def flops_per_sample(channels: int) -> int:
    """Multiply-add FLOPs (2 per MAC) of one forward pass, for reporting GFLOP/s."""
    total = 0
    side = IMAGE_SIZE
    cin = channels
    for width in CONV_WIDTHS:
        total += 2 * side * side * 9 * (cin * width + width * width)
        side //= 2
        cin = width
    dims = [CONV_WIDTHS[-1] * side * side, *DENSE_WIDTHS, N_CLASSES]
    total += sum(2 * a * b for a, b in itertools.pairwise(dims))
    return total


def export_onnx(net: Hust19Cnn, path: Path) -> None:
    """Write ``net`` (plus softmax) as ONNX with a dynamic batch dimension, opset 17.

    Input ``image`` float32 (N, C, 200, 200) in [0, 1]; output ``proba`` float32 (N, 3).
    """
    net.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    net.eval()
    model = WithSoftmax(net).eval()
    dummy = torch.zeros(1, net.channels, IMAGE_SIZE, IMAGE_SIZE)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated in favour of torch.export, which needs
        # onnxscript (not a dependency); its output for this plain CNN is the same graph
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (dummy,), str(path), input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=ONNX_OPSET,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          dynamo=False)
