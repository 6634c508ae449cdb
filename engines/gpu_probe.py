"""Is there a usable NVIDIA GPU here? Asked in a child process, answered once per process.

Why a child process: on a machine without an NVIDIA driver, constructing TensorRT or CUDA
objects can log a CUDA initialisation failure and crash the interpreter later (GPU.md). The
probe therefore runs a tiny script in a fresh ``python`` that talks to the driver API
(``libcuda.so.1``) and NVML through :mod:`ctypes` only, prints one JSON object and exits. If that
child crashes, times out or finds no driver, this process learns "no GPU" and why, and has
loaded nothing CUDA-related itself.

Public API: :func:`probe_gpu` (the first visible device or ``None``), :func:`gpu_status` (all
visible devices plus the reason when there are none), :func:`gpu_packages` (installed versions
of the ``gpu`` extra, read from package metadata without importing anything), and
:func:`clear_cache` for tests.
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any, Final

log = logging.getLogger(__name__)

#: Seconds the child may take (cuInit on a many-GPU box can take several seconds).
PROBE_TIMEOUT_S: Final = 60.0
#: Distributions of the ``gpu`` extra (and alternatives) whose versions are reported.
GPU_DISTRIBUTIONS: Final = ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu12-libs",
                            "tensorrt-cu13-libs", "pycuda", "cupy-cuda12x", "cupy-cuda13x",
                            "cuda-python", "cuda-bindings", "onnxruntime-gpu")

# The child script: ctypes only, never raises, always prints exactly one JSON object.
# Constants from cuda.h: CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76.
_PROBE_SCRIPT: Final = r"""
import ctypes, json
out = {"devices": [], "driver_version": None, "cuda_driver_api": None, "error": None}
def emit():
    print(json.dumps(out))
try:
    cu = ctypes.CDLL("libcuda.so.1")
except OSError as exc:
    out["error"] = "no NVIDIA driver: libcuda.so.1 cannot be loaded (%s)" % exc
    emit(); raise SystemExit(0)
v = ctypes.c_int(0)
if cu.cuDriverGetVersion(ctypes.byref(v)) == 0:
    out["cuda_driver_api"] = "%d.%d" % (v.value // 1000, (v.value % 1000) // 10)
try:
    nvml = ctypes.CDLL("libnvidia-ml.so.1")
    if nvml.nvmlInit_v2() == 0:
        buf = ctypes.create_string_buffer(96)
        if nvml.nvmlSystemGetDriverVersion(buf, 96) == 0:
            out["driver_version"] = buf.value.decode()
        nvml.nvmlShutdown()
except OSError:
    pass
rc = cu.cuInit(0)
if rc != 0:
    out["error"] = "cuInit failed with CUresult %d (100 = no CUDA device)" % rc
    emit(); raise SystemExit(0)
n = ctypes.c_int(0)
rc = cu.cuDeviceGetCount(ctypes.byref(n))
if rc != 0 or n.value == 0:
    out["error"] = "no CUDA device visible (cuDeviceGetCount rc=%d, count=%d)" % (rc, n.value)
    emit(); raise SystemExit(0)
for i in range(n.value):
    dev = ctypes.c_int(0)
    if cu.cuDeviceGet(ctypes.byref(dev), i) != 0:
        continue
    name = ctypes.create_string_buffer(256)
    cu.cuDeviceGetName(name, 256, dev)
    major = ctypes.c_int(0); minor = ctypes.c_int(0)
    cu.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)
    cu.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)
    mem = ctypes.c_size_t(0)
    cu.cuDeviceTotalMem_v2(ctypes.byref(mem), dev)
    out["devices"].append({"index": i, "name": name.value.decode(errors="replace"),
                           "compute_capability": [major.value, minor.value],
                           "total_memory_bytes": mem.value})
emit()
"""


@dataclass(frozen=True)
class GpuInfo:
    """One visible NVIDIA GPU, as the driver reports it."""

    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory_bytes: int
    driver_version: str | None = None
    cuda_driver_api: str | None = None

    @property
    def compute_capability_str(self) -> str:
        """``"8.9"`` style, as engine cache keys and logs use it."""
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"

    def describe(self) -> str:
        """One line for logs and ``hust19 doctor``."""
        mib = self.total_memory_bytes // (1 << 20)
        return (f"GPU {self.index}: {self.name} (compute {self.compute_capability_str}, "
                f"{mib} MiB, driver {self.driver_version or '?'}, "
                f"CUDA {self.cuda_driver_api or '?'})")


@dataclass(frozen=True)
class GpuStatus:
    """Everything the probe learnt: the devices, or why there are none."""

    devices: tuple[GpuInfo, ...] = ()
    reason: str | None = None
    packages: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``hust19 doctor``, the benchmark)."""
        return {"devices": [asdict(d) for d in self.devices], "reason": self.reason,
                "packages": dict(self.packages)}


def parse_probe_output(text: str) -> GpuStatus:
    """The child's JSON line -> :class:`GpuStatus`. Pure (tested without a GPU); anything that
    is not the expected JSON becomes "no GPU" with the reason."""
    try:
        raw = json.loads(text.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        return GpuStatus(reason=f"GPU probe printed no JSON ({exc}): {text[:200]!r}")
    if not isinstance(raw, dict):
        return GpuStatus(reason=f"GPU probe printed unexpected JSON: {raw!r}")
    devices = []
    for d in raw.get("devices") or []:
        try:
            cc = d["compute_capability"]
            devices.append(GpuInfo(index=int(d["index"]), name=str(d["name"]),
                                   compute_capability=(int(cc[0]), int(cc[1])),
                                   total_memory_bytes=int(d["total_memory_bytes"]),
                                   driver_version=raw.get("driver_version"),
                                   cuda_driver_api=raw.get("cuda_driver_api")))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            return GpuStatus(reason=f"GPU probe device entry unreadable ({exc}): {d!r}")
    if not devices:
        return GpuStatus(reason=str(raw.get("error") or "no CUDA device found"))
    return GpuStatus(devices=tuple(devices))


def gpu_packages() -> dict[str, str]:
    """Installed versions of the GPU packages, from metadata only (nothing is imported)."""
    found: dict[str, str] = {}
    for dist in GPU_DISTRIBUTIONS:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found


@functools.lru_cache(maxsize=1)
def gpu_status() -> GpuStatus:
    """Probe once per process (cached): the visible GPUs, or the reason there are none."""
    packages = gpu_packages()
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE_SCRIPT], capture_output=True,
                              text=True, timeout=PROBE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        status = GpuStatus(reason=f"GPU probe timed out after {PROBE_TIMEOUT_S:.0f} s")
    except OSError as exc:
        status = GpuStatus(reason=f"GPU probe could not start: {exc}")
    else:
        if done.returncode != 0:
            status = GpuStatus(reason=f"GPU probe exited with status {done.returncode}: "
                                      f"{done.stderr.strip()[-300:]}")
        else:
            status = parse_probe_output(done.stdout)
    status = GpuStatus(devices=status.devices, reason=status.reason, packages=packages)
    if status.devices:
        for d in status.devices:
            log.info("found %s", d.describe())
    else:
        log.info("no usable NVIDIA GPU: %s", status.reason)
    return status


def probe_gpu() -> GpuInfo | None:
    """The first visible NVIDIA GPU (the one CUDA's primary context uses), or ``None``.

    Never loads CUDA or TensorRT into this process; cached after the first call."""
    status = gpu_status()
    return status.devices[0] if status.devices else None


def clear_cache() -> None:
    """Forget the cached probe (tests; after hot-plugging a driver)."""
    gpu_status.cache_clear()
