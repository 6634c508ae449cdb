"""TensorRT backend: ONNX -> cached TensorRT engine, run through pycuda.

Implements :class:`engines.inference.InferenceBackend` on an NVIDIA GPU. Nothing here imports
TensorRT or pycuda at module import time: :func:`probe` only looks for the packages and asks
:mod:`engines.gpu_probe` (a child process) for a GPU, and :class:`TensorRTBackend` imports them
in its constructor, turning every failure into :class:`BackendUnavailable` so that
:func:`engines.backends.create_backend` falls back to ONNX Runtime with a warning.

Building (once, at start-up or with ``hust19 engines build``; never per request):
``Builder`` -> network -> ``OnnxParser.parse_from_file`` -> builder config with a workspace
limit (``set_memory_pool_limit``) and one optimisation profile over the batch dimension (min 1,
opt 16, max ``max_batch``) -> ``build_serialized_network`` (``None`` means the build failed) ->
the plan is stored in :class:`engines.engine_cache.EngineCache` and deserialized from there on
every later start. Precision follows TensorRT 11's strongly typed model (the 10.x builder
precision flags are deprecated since 10.12 and removed in 11): FP16 is the FP16 ONNX variant
from :mod:`engines.fp16` built as a strongly typed network (``STRONGLY_TYPED`` creation flag:
required on 10.x, accepted and ignored on 11.x). Only a TensorRT without that flag falls back
to ``BuilderFlag.FP16`` on the FP32 model.

Running: pycuda on the primary context (``pycuda.autoprimaryctx``, shared with TensorRT and
CuPy), one CUDA stream per backend instance, and device + page-locked host buffers allocated
once for ``max_batch`` at start-up (planned by the pure :func:`plan_buffers`). A call copies its
batch into the pinned buffers, sets the input shapes and tensor addresses, enqueues
``execute_async_v3`` and copies the outputs back on the same stream: no allocation per call
except the returned arrays. :meth:`TensorRTBackend.run_device` takes inputs that already live
on the GPU (CuPy arrays, anything with ``__cuda_array_interface__``) by pointer, with no host
round trip.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np

from engines.engine_cache import EngineCache, EngineKey, ProfileShape
from engines.gpu_probe import gpu_status, probe_gpu
from engines.inference import InferenceBackend, TensorSpec, file_sha256
from schemas.errors import BackendUnavailable, EngineError

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16"]
PRECISIONS: Final = ("fp32", "fp16")
DEFAULT_PRECISION: Final[Precision] = "fp16"
DEFAULT_MAX_BATCH: Final = 64
#: The batch TensorRT tunes its kernels for: the worker's usual micro-batch.
DEFAULT_OPT_BATCH: Final = 16
DEFAULT_WORKSPACE_MB: Final = 1024
MIN_BATCH: Final = 1
#: First TensorRT major version in which every network is strongly typed.
STRONG_TYPING_ONLY_MAJOR: Final = 11
MIB: Final = 1 << 20
#: ``__cuda_array_interface__`` stream values that need no explicit wait: no stream given, or
#: the legacy default stream (pycuda's streams are blocking, so they already wait for it).
_CAI_NO_SYNC: Final = (None, 1)
GPU_EXTRA_HINT: Final = "install the 'gpu' extra (pip install 'hust19-agent[gpu]') or use " \
                        "NVIDIA's TensorRT container"


# ---------------------------------------------------------------- pure planning (CPU-testable)

@dataclass(frozen=True)
class IoSpec:
    """A model or engine I/O tensor: name, shape (-1 = dynamic), NumPy dtype name, direction."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    is_input: bool


@dataclass(frozen=True)
class BufferPlan:
    """One buffer to allocate (device and page-locked host) for a given batch size."""

    name: str
    is_input: bool
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


def plan_buffers(specs: list[IoSpec], batch: int) -> list[BufferPlan]:
    """Concrete buffer shapes for ``batch``: the leading dynamic (-1) dimension becomes
    ``batch``. Any other dynamic dimension is refused (:class:`EngineError`): the HUST-19
    networks have fixed image and feature sizes, and an engine with more dynamic axes would
    need an output allocator, not fixed buffers."""
    if batch < MIN_BATCH:
        raise EngineError(f"batch must be >= {MIN_BATCH}, got {batch}")
    plans = []
    for spec in specs:
        if not spec.shape:
            raise EngineError(f"tensor {spec.name} is a scalar; a batch dimension is needed")
        lead, rest = spec.shape[0], spec.shape[1:]
        if any(d < 0 for d in rest):
            raise EngineError(f"tensor {spec.name} has dynamic non-batch dimensions "
                              f"{spec.shape}; only the batch dimension may be dynamic")
        shape = (batch if lead < 0 else lead, *rest)
        nbytes = math.prod(shape) * np.dtype(spec.dtype).itemsize
        plans.append(BufferPlan(spec.name, spec.is_input, shape, spec.dtype, nbytes))
    return plans


def batch_profile(specs: list[IoSpec], max_batch: int,
                  opt_batch: int = DEFAULT_OPT_BATCH) -> tuple[ProfileShape, ...]:
    """The optimisation profile: every input's batch dimension from 1 to ``max_batch``, tuned
    for ``min(opt_batch, max_batch)``; other dimensions fixed."""
    if max_batch < MIN_BATCH:
        raise EngineError(f"max_batch must be >= {MIN_BATCH}, got {max_batch}")
    opt = max(MIN_BATCH, min(opt_batch, max_batch))
    out = []
    for spec in specs:
        if not spec.is_input:
            continue
        rest = spec.shape[1:]
        if any(d < 0 for d in rest):
            raise EngineError(f"input {spec.name} has dynamic non-batch dimensions {spec.shape}")
        out.append(ProfileShape(spec.name, (MIN_BATCH, *rest), (opt, *rest), (max_batch, *rest)))
    return tuple(out)


def split_batches(n: int, max_batch: int) -> list[slice]:
    """``range(n)`` cut into consecutive slices of at most ``max_batch``."""
    return [slice(i, min(i + max_batch, n)) for i in range(0, n, max_batch)]


_ONNX_DTYPES: Final = {1: "float32", 10: "float16", 11: "float64", 7: "int64", 6: "int32",
                       2: "uint8", 3: "int8", 9: "bool"}


def io_specs_from_onnx(model_path: Path) -> list[IoSpec]:
    """The graph inputs (initialisers excluded) and outputs of an ONNX file, read with
    ``onnx`` on the CPU. Symbolic or unknown dimensions are -1."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise EngineError(f"cannot read ONNX model {model_path}: {exc}") from exc
    initialisers = {i.name for i in model.graph.initializer}

    def spec(value: Any, is_input: bool) -> IoSpec:
        t = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
                     for d in t.shape.dim)
        dtype = _ONNX_DTYPES.get(t.elem_type)
        if dtype is None:
            raise EngineError(f"{model_path.name}: tensor {value.name} has unsupported ONNX "
                              f"element type {t.elem_type}")
        return IoSpec(value.name, dims, dtype, is_input)

    inputs = [spec(v, True) for v in model.graph.input if v.name not in initialisers]
    return inputs + [spec(v, False) for v in model.graph.output]


@dataclass(frozen=True)
class DeviceArray:
    """A GPU array seen through ``__cuda_array_interface__``: pointer, shape, dtype, stream."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    stream: int | None

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize


def device_array(obj: Any) -> DeviceArray:
    """Read ``obj.__cuda_array_interface__`` (CuPy, Numba, PyTorch...). Only C-contiguous
    arrays are accepted (TensorRT reads dense rows); raises :class:`EngineError` otherwise."""
    cai = getattr(obj, "__cuda_array_interface__", None)
    if not isinstance(cai, dict):
        raise EngineError(f"{type(obj).__name__} has no __cuda_array_interface__")
    try:
        shape = tuple(int(d) for d in cai["shape"])
        dtype = np.dtype(cai["typestr"])
        ptr = int(cai["data"][0])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise EngineError(f"malformed __cuda_array_interface__: {exc}") from exc
    strides = cai.get("strides")
    if strides is not None:
        dense = [dtype.itemsize]
        for d in reversed(shape[1:]):
            dense.insert(0, dense[0] * d)
        if tuple(int(s) for s in strides) != tuple(dense):
            raise EngineError(f"device array with strides {strides} is not C-contiguous")
    if cai.get("mask") is not None:
        raise EngineError("masked device arrays are not supported")
    stream = cai.get("stream")
    return DeviceArray(ptr, shape, dtype, None if stream is None else int(stream))


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/hust19/engines`` (``~/.cache/...``) when no cache dir is configured."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hust19" / "engines"


# ---------------------------------------------------------------------------- availability

def probe() -> tuple[bool, str]:
    """Whether the TensorRT backend can run here, and why (not). Imports neither TensorRT nor
    pycuda; the GPU is probed in a child process (cached)."""
    missing = [m for m in ("tensorrt", "pycuda") if importlib.util.find_spec(m) is None]
    if missing:
        why = f"{' and '.join(missing)} not installed: {GPU_EXTRA_HINT}"
        log.info("TensorRT backend not usable: %s", why)
        return False, why
    gpu = probe_gpu()
    if gpu is None:
        why = f"no usable NVIDIA GPU: {gpu_status().reason}"
        log.info("TensorRT backend not usable: %s", why)
        return False, why
    return True, gpu.describe()


_TRT_LOGGER: Any = None
_TRT_LOGGER_LOCK = threading.Lock()


def _import_gpu_stack() -> tuple[Any, Any, Any]:
    """``(tensorrt, pycuda.driver, primary context)``, or :class:`BackendUnavailable`."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or the stub wheel's own errors
        raise BackendUnavailable(f"cannot import tensorrt ({exc}): {GPU_EXTRA_HINT}") from exc
    try:
        import pycuda.autoprimaryctx as primary
        import pycuda.driver as cuda
    except Exception as exc:  # ImportError or pycuda's driver errors (no device, bad driver)
        raise BackendUnavailable(f"cannot initialise CUDA through pycuda: {exc}") from exc
    return trt, cuda, primary.context


def _trt_logger(trt: Any) -> Any:
    """One ``trt.ILogger`` per process that forwards TensorRT's messages to :mod:`logging`."""
    global _TRT_LOGGER
    with _TRT_LOGGER_LOCK:
        if _TRT_LOGGER is None:
            sev = trt.ILogger.Severity
            levels = {sev.INTERNAL_ERROR: logging.ERROR, sev.ERROR: logging.ERROR,
                      sev.WARNING: logging.WARNING, sev.INFO: logging.DEBUG,
                      sev.VERBOSE: logging.DEBUG}

            class _Logger(trt.ILogger):  # trt is Any: subclassing is unchecked
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)

                def log(self, severity: Any, msg: str) -> None:
                    log.log(levels.get(severity, logging.INFO), "TensorRT: %s", msg)

            _TRT_LOGGER = _Logger()
        return _TRT_LOGGER


def _strongly_typed(trt: Any) -> bool:
    """TensorRT 11+ builds strongly typed networks only (the creation flag is deprecated and
    may disappear); 9.x/10.x do so when asked with ``STRONGLY_TYPED``."""
    major = int(str(trt.__version__).split(".")[0])
    return major >= STRONG_TYPING_ONLY_MAJOR or hasattr(trt.NetworkDefinitionCreationFlag,
                                                        "STRONGLY_TYPED")


_TRT_DTYPE_NAMES: Final = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32",
                           "INT64": "int64", "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


def _numpy_dtype(trt: Any, dtype: Any) -> str:
    """NumPy dtype name of a ``trt.DataType`` (``trt.nptype`` where it exists)."""
    nptype = getattr(trt, "nptype", None)
    if nptype is not None:
        try:
            return np.dtype(nptype(dtype)).name
        except TypeError:
            pass
    name = _TRT_DTYPE_NAMES.get(getattr(dtype, "name", str(dtype)).rsplit(".", 1)[-1])
    if name is None:
        raise BackendUnavailable(f"engine tensor type {dtype} has no NumPy equivalent")
    return name


# ----------------------------------------------------------------------------- the backend

class TensorRTBackend(InferenceBackend):
    """One ONNX model as a TensorRT engine on the current GPU. One instance per worker thread
    (one stream, one execution context, one set of buffers); not thread-safe."""

    name = "tensorrt"

    def __init__(self, model_path: Path, *, cache_dir: Path | None = None,
                 precision: Precision = DEFAULT_PRECISION, max_batch: int = DEFAULT_MAX_BATCH,
                 opt_batch: int = DEFAULT_OPT_BATCH,
                 workspace_mb: int = DEFAULT_WORKSPACE_MB) -> None:
        if precision not in PRECISIONS:
            raise EngineError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if not model_path.is_file():
            raise EngineError(f"model file not found: {model_path}")
        self.model_path = model_path
        self.precision: Precision = precision
        self.max_batch = max_batch
        self.cache = EngineCache(cache_dir or default_cache_dir())
        self.build_seconds: float | None = None  # None: loaded from the cache
        self._closed = False
        self._trt, self._cuda, self._ctx = _import_gpu_stack()
        self._ctx.push()
        try:
            self._setup(opt_batch, workspace_mb)
        except BackendUnavailable:
            raise
        except EngineError as exc:
            raise BackendUnavailable(exc.message) from exc
        except self._cuda.Error as exc:
            raise BackendUnavailable(f"CUDA error while loading {model_path.name}: {exc}") \
                from exc
        except Exception as exc:  # TensorRT's bindings raise untyped errors (RuntimeError...)
            raise BackendUnavailable(f"TensorRT failed while loading {model_path.name}: "
                                     f"{exc!r}") from exc
        finally:
            self._ctx.pop()

    # -- set-up ---------------------------------------------------------------------------

    def _setup(self, opt_batch: int, workspace_mb: int) -> None:
        trt = self._trt
        device = self._ctx.get_device()
        self.gpu_name = str(device.name())
        cc = device.compute_capability()
        strongly_typed = _strongly_typed(trt)
        if self.precision == "fp16" and strongly_typed:
            from engines.fp16 import ensure_fp16

            self.onnx_path = ensure_fp16(self.model_path, fallback_dir=self.cache.root / "onnx")
        else:
            self.onnx_path = self.model_path
        specs = io_specs_from_onnx(self.onnx_path)
        self.key = EngineKey(
            model_name=self.model_path.name.removesuffix(".onnx"),
            onnx_sha256=file_sha256(self.onnx_path),
            trt_version=str(trt.__version__),
            gpu_name=self.gpu_name,
            compute_capability=f"{cc[0]}.{cc[1]}",
            precision=self.precision,
            profiles=batch_profile(specs, self.max_batch, opt_batch),
            workspace_bytes=workspace_mb * MIB,
            builder_options=(("strongly_typed", str(int(strongly_typed))),),
        )
        self._engine = self._load_or_build(strongly_typed)
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BackendUnavailable(f"TensorRT could not create an execution context for "
                                     f"{self.key.model_name} (out of GPU memory?)")
        self._specs = self._engine_specs()
        self._plans = plan_buffers(self._specs, self.max_batch)
        self._stream = self._cuda.Stream()
        self._host: dict[str, np.ndarray] = {}
        self._device: dict[str, Any] = {}
        for plan in self._plans:
            self._host[plan.name] = self._cuda.pagelocked_empty(plan.shape, np.dtype(plan.dtype))
            self._device[plan.name] = self._cuda.mem_alloc(plan.nbytes)
        total = sum(p.nbytes for p in self._plans)
        log.info("TensorRT %s %s engine ready for %s on %s (batch <= %d, I/O buffers %.1f MiB, "
                 "%s)", trt.__version__, self.precision, self.key.model_name, self.gpu_name,
                 self.max_batch, total / MIB,
                 "loaded from cache" if self.build_seconds is None
                 else f"built in {self.build_seconds:.1f} s")

    def _load_or_build(self, strongly_typed: bool) -> Any:
        # the runtime must outlive the engines it deserialized: kept on the instance
        self._runtime = runtime = self._trt.Runtime(_trt_logger(self._trt))
        with self.cache.build_lock(self.key):
            plan = self.cache.load(self.key)
            if plan is not None:
                engine = runtime.deserialize_cuda_engine(plan)
                if engine is not None:
                    log.info("loaded cached TensorRT engine %s",
                             self.cache.engine_path(self.key).name)
                    return engine
                self.cache.invalidate(self.key, "TensorRT could not deserialize it")
            plan = self._build(strongly_typed)
            self.cache.store(self.key, plan, self.build_seconds or 0.0)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise BackendUnavailable(f"TensorRT could not deserialize the engine it just built "
                                     f"for {self.key.model_name}")
        return engine

    def _build(self, strongly_typed: bool) -> bytes:
        trt = self._trt
        logger = _trt_logger(trt)
        started = time.monotonic()
        builder = trt.Builder(logger)
        flags = 0
        flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if strongly_typed and flag is not None:  # required on 10.x, ignored on 11.x
            flags |= 1 << int(flag)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(self.onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendUnavailable(f"TensorRT cannot parse {self.onnx_path.name}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.key.workspace_bytes)
        if self.precision == "fp16" and not strongly_typed:
            flag = getattr(trt.BuilderFlag, "FP16", None)
            if flag is None:
                raise BackendUnavailable("this TensorRT has neither strongly typed networks nor "
                                         "the FP16 builder flag")
            config.set_flag(flag)
        profile = builder.create_optimization_profile()
        for shape in self.key.profiles:
            profile.set_shape(shape.name, shape.min, shape.opt, shape.max)
        config.add_optimization_profile(profile)
        log.info("building TensorRT %s engine for %s (%s, batch 1..%d, workspace %d MiB); this "
                 "takes a while once per model and GPU", self.precision, self.key.model_name,
                 self.onnx_path.name, self.max_batch, self.key.workspace_bytes // MIB)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BackendUnavailable(f"TensorRT failed to build an engine for "
                                     f"{self.key.model_name} (see the TensorRT log lines)")
        self.build_seconds = time.monotonic() - started
        log.info("built TensorRT engine for %s in %.1f s", self.key.model_name,
                 self.build_seconds)
        return bytes(memoryview(serialized))

    def _engine_specs(self) -> list[IoSpec]:
        trt, engine = self._trt, self._engine
        specs = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            specs.append(IoSpec(
                name=name,
                shape=tuple(int(d) for d in engine.get_tensor_shape(name)),
                dtype=_numpy_dtype(trt, engine.get_tensor_dtype(name)),
                is_input=engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT))
        return specs

    # -- InferenceBackend ---------------------------------------------------------------------

    @property
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec(s.name, s.shape, s.dtype) for s in self._specs if s.is_input]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec(s.name, s.shape, s.dtype) for s in self._specs if not s.is_input]

    def info(self) -> dict[str, Any]:
        """What ``hust19 doctor`` and the metrics report about this backend."""
        return {"backend": self.name, "model": self.key.model_name, "precision": self.precision,
                "tensorrt": self.key.trt_version, "gpu": self.gpu_name,
                "compute_capability": self.key.compute_capability, "max_batch": self.max_batch,
                "engine": str(self.cache.engine_path(self.key)),
                "build_seconds": self.build_seconds}

    def _batch_of(self, shapes: dict[str, tuple[int, ...]]) -> int:
        names = {s.name for s in self._specs if s.is_input}
        if set(shapes) != names:
            raise EngineError(f"{self.key.model_name} expects inputs {sorted(names)}, "
                              f"got {sorted(shapes)}")
        batches = {shape[0] if shape else -1 for shape in shapes.values()}
        if len(batches) != 1:
            raise EngineError(f"inputs disagree on the batch size: {shapes}")
        for spec in self._specs:
            if spec.is_input and tuple(shapes[spec.name][1:]) != spec.shape[1:]:
                raise EngineError(f"input {spec.name} must be (N, {spec.shape[1:]}), "
                                  f"got {shapes[spec.name]}")
        return batches.pop()

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays in, host arrays out; batches above ``max_batch`` run in chunks."""
        self._check_open()
        arrays = {name: np.asarray(a) for name, a in inputs.items()}
        n = self._batch_of({k: tuple(v.shape) for k, v in arrays.items()})
        chunks = []
        for part in split_batches(n, self.max_batch):
            chunks.append(self._execute({k: v[part] for k, v in arrays.items()},
                                        part.stop - part.start, device_ptrs=None))
        return self._concat(chunks, n)

    def run_device(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """Inputs already on the GPU (``__cuda_array_interface__``: CuPy...), read in place by
        pointer; outputs come back as host arrays (they are small: N x 3 probabilities).

        The producer's work must be on the legacy default stream or on the stream named in the
        interface (that stream is synchronised before the engine reads)."""
        self._check_open()
        views = {name: device_array(a) for name, a in inputs.items()}
        n = self._batch_of({k: v.shape for k, v in views.items()})
        for spec in self._specs:
            if spec.is_input and views[spec.name].dtype != np.dtype(spec.dtype):
                raise EngineError(f"input {spec.name} must be {spec.dtype} on the device, "
                                  f"got {views[spec.name].dtype}")
        for view in views.values():
            if view.stream not in _CAI_NO_SYNC:
                _stream_synchronize(view.stream)
        chunks = []
        for part in split_batches(n, self.max_batch):
            ptrs = {k: v.ptr + part.start * v.row_bytes for k, v in views.items()}
            chunks.append(self._execute({}, part.stop - part.start, device_ptrs=ptrs))
        return self._concat(chunks, n)

    def _concat(self, chunks: list[dict[str, np.ndarray]], n: int) -> dict[str, np.ndarray]:
        if not chunks:  # n == 0
            return {s.name: np.empty((0, *s.shape[1:]), s.dtype)
                    for s in self._specs if not s.is_input}
        if len(chunks) == 1:
            return chunks[0]
        return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}

    def _execute(self, host_inputs: dict[str, np.ndarray], n: int,
                 device_ptrs: dict[str, int] | None) -> dict[str, np.ndarray]:
        cuda, context, stream = self._cuda, self._context, self._stream
        self._ctx.push()
        try:
            for plan in self._plans:
                if not plan.is_input:
                    continue
                if device_ptrs is None:
                    host = self._host[plan.name][:n]
                    np.copyto(host, host_inputs[plan.name], casting="same_kind")
                    cuda.memcpy_htod_async(self._device[plan.name], host, stream)
                    address = int(self._device[plan.name])
                else:
                    address = device_ptrs[plan.name]
                if not context.set_input_shape(plan.name, (n, *plan.shape[1:])):
                    raise EngineError(f"TensorRT refused input shape {(n, *plan.shape[1:])} "
                                      f"for {plan.name}")
                context.set_tensor_address(plan.name, address)
            for plan in self._plans:
                if not plan.is_input:
                    context.set_tensor_address(plan.name, int(self._device[plan.name]))
            if not context.execute_async_v3(stream.handle):
                raise EngineError(f"TensorRT execution failed for {self.key.model_name}")
            out = {}
            for plan in self._plans:
                if not plan.is_input:
                    host = self._host[plan.name][:n]
                    cuda.memcpy_dtoh_async(host, self._device[plan.name], stream)
                    out[plan.name] = host
            stream.synchronize()
            return {name: a.copy() for name, a in out.items()}
        except cuda.Error as exc:
            raise EngineError(f"CUDA error running {self.key.model_name}: {exc}") from exc
        finally:
            self._ctx.pop()

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError(f"TensorRT backend for {self.model_path.name} is closed")

    def close(self) -> None:
        """Free the device buffers, context and engine (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._ctx.push()
        try:
            for buf in getattr(self, "_device", {}).values():
                buf.free()
            self._device = {}
            self._context = None
            self._engine = None
            self._runtime = None
        finally:
            self._ctx.pop()


def _stream_synchronize(handle: int) -> None:
    """Wait for a foreign CUDA stream (a producer named in ``__cuda_array_interface__``)."""
    lib = ctypes.CDLL("libcuda.so.1")
    rc = lib.cuStreamSynchronize(ctypes.c_void_p(handle))
    if rc != 0:
        raise EngineError(f"cuStreamSynchronize({handle:#x}) failed with CUresult {rc}")
