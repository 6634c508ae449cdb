"""Where a model was trained: the CPU, the core count and the numerical libraries, recorded
in every model's metadata (``training.platform``).

A training is deterministic on one machine, but its floating-point rounding depends on the
CPU the math libraries dispatch for: the same code and seed gave two different ``cf.onnx``
files on two machines (``docs/models/cf.md``, "Data and protocol"). Retraining to compare
bytes is only meaningful on a machine like the one named here.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Final

_CPUINFO: Final = Path("/proc/cpuinfo")
_LIBRARIES: Final = ("torch", "numpy", "scikit-learn", "onnx", "onnxruntime")


def cpu_model(cpuinfo: Path = _CPUINFO) -> str:
    """The processor's name as the kernel reports it (``model name``), else what
    :func:`platform.processor` says, else ``"unknown"``."""
    try:
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def training_platform() -> dict[str, object]:
    """The training machine and library versions, for a model's metadata. Names torch's CPU
    kernel level (``AVX512``, ``AVX2``, ...) and thread count when torch is loaded."""
    info: dict[str, object] = {
        "cpu": cpu_model(), "machine": platform.machine(), "cores": os.cpu_count(),
        "python": platform.python_version(),
        "libraries": {name: v for name in _LIBRARIES if (v := _version(name)) is not None},
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["torch_threads"] = torch.get_num_threads()
    return info
