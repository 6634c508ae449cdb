"""GPU probe: answers without crashing and without loading CUDA into the test process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from engines import gpu_probe
from engines.gpu_probe import GpuInfo, parse_probe_output, probe_gpu

# What the probe child printed on an H100 box (format recorded from the probe script).
H100_LINE = json.dumps({
    "devices": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0],
                 "total_memory_bytes": 85_029_158_912}],
    "driver_version": "550.54.15", "cuda_driver_api": "12.4", "error": None})


def _driver_present() -> bool:
    return Path("/dev/nvidiactl").exists()


def test_probe_matches_this_machine_and_loads_no_cuda() -> None:
    gpu_probe.clear_cache()
    info = probe_gpu()
    status = gpu_probe.gpu_status()
    if _driver_present():
        assert info is not None and info.total_memory_bytes > 0
    else:
        assert info is None
        assert status.reason and ("driver" in status.reason or "device" in status.reason)
    loaded = [m for m in ("tensorrt", "pycuda", "cupy", "cuda") if m in sys.modules]
    assert loaded == []
    assert gpu_probe.gpu_status() is status  # cached


def test_import_of_gpu_modules_loads_no_gpu_package() -> None:
    code = ("import sys, engines.tensorrt_backend, engines.gpu_probe, engines.engine_cache, "
            "engines.lung_gpu\nprint([m for m in ('tensorrt', 'pycuda', 'cupy', 'cuda') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_parse_recorded_gpu_line() -> None:
    status = parse_probe_output("some driver chatter\n" + H100_LINE + "\n")
    assert status.reason is None
    assert status.devices == (GpuInfo(0, "NVIDIA H100 80GB HBM3", (9, 0), 85_029_158_912,
                                       "550.54.15", "12.4"),)
    assert status.devices[0].compute_capability_str == "9.0"
    assert "H100" in status.devices[0].describe()


def test_parse_failures_become_reasons() -> None:
    assert parse_probe_output("").reason
    assert parse_probe_output("Segmentation fault").reason
    no_dev = parse_probe_output(json.dumps({"devices": [], "error": "cuInit failed with "
                                            "CUresult 100"}))
    assert no_dev.devices == () and "cuInit" in (no_dev.reason or "")
    broken = parse_probe_output(json.dumps({"devices": [{"index": 0}]}))
    assert broken.devices == () and "unreadable" in (broken.reason or "")
