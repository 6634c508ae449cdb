"""The training platform recorded in model metadata (``engines.training.provenance``)."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

import pytest

from engines.training.provenance import cpu_model, training_platform

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme avx2

processor\t: 1
model name\t: AMD EPYC 7B13
"""


def test_cpu_model_is_the_kernels_model_name(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO)
    assert cpu_model(info) == "AMD EPYC 7B13"


def test_cpu_model_without_cpuinfo_falls_back(tmp_path: Path) -> None:
    assert cpu_model(tmp_path / "absent") == (platform.processor() or "unknown")
    (tmp_path / "empty").write_text("processor\t: 0\nmodel name\t:\n")
    assert cpu_model(tmp_path / "empty") == (platform.processor() or "unknown")


def test_training_platform_names_the_libraries_and_torch_kernels() -> None:
    torch = pytest.importorskip("torch", reason="torch is in the 'train' extra")
    info = training_platform()
    assert info["cpu"] == cpu_model()
    assert info["machine"] == platform.machine()
    libraries = info["libraries"]
    assert isinstance(libraries, dict)
    assert libraries["torch"] == metadata.version("torch") == torch.__version__
    assert libraries["numpy"] == metadata.version("numpy")
    assert info["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["torch_threads"] == torch.get_num_threads()
