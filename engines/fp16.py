"""FP16 (mixed-precision) ONNX variants of the shipped models, checked against FP32.

TensorRT 11 builds strongly typed networks only (the FP16 builder flag is gone; 10.12
deprecated it): the precision an engine runs in is the precision written in the ONNX graph.
So "an FP16 engine" means an engine built from an FP16 variant of the model. This module makes
that variant with ``onnxconverter_common.float16.convert_float_to_float16(keep_io_types=True)``
(weights and activations FP16, inputs and outputs stay FP32, so callers feed and read the same
arrays as before), checks it against the FP32 model in ONNX Runtime on the CPU, and writes it
beside the original as ``<name>.fp16.onnx`` with the FP32 file's SHA-256 in its metadata, so a
variant made from an older model is recognised as stale and remade.

The check runs both models on the same inputs (the caller's real samples, or seeded uniform
[0, 1) values: the networks' inputs are [0, 1]-scaled images and normalised features) and
reports the largest absolute difference over all outputs; the HUST-19 models output softmax
probabilities, so that is the "max abs probability difference". A variant beyond the tolerance
is not written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from engines.engine_cache import atomic_write_bytes
from engines.inference import file_sha256
from schemas.errors import EngineError

log = logging.getLogger(__name__)

FP16_SUFFIX: Final = ".fp16.onnx"
#: ONNX metadata_props key holding the SHA-256 of the FP32 file a variant was made from.
SOURCE_SHA_KEY: Final = "hust19.fp16.source_sha256"
#: Largest accepted |p_fp16 - p_fp32|; the GPU parity target for probabilities is 0.01.
DEFAULT_TOLERANCE: Final = 0.01
#: Batch of the generated check inputs (dynamic dimensions take this size).
CHECK_BATCH: Final = 8
CHECK_SEED: Final = 19

_NUMPY_OF_ORT: Final = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                        "tensor(double)": np.float64, "tensor(int64)": np.int64,
                        "tensor(int32)": np.int32}


@dataclass(frozen=True)
class Fp16Report:
    """Result of one conversion: where, from what, and how far FP16 moved the outputs."""

    source: Path
    target: Path
    source_sha256: str
    max_abs_diff: float
    batch: int
    seconds: float
    written: bool


def fp16_path(model_path: Path) -> Path:
    """``slice.onnx`` -> ``slice.fp16.onnx`` (same directory)."""
    return model_path.with_name(model_path.name.removesuffix(".onnx") + FP16_SUFFIX)


def is_fp16_variant(path: Path) -> bool:
    return path.name.endswith(FP16_SUFFIX)


def source_sha256_of(fp16_model: Path) -> str | None:
    """The FP32 SHA-256 recorded in a variant, or ``None`` (not a variant / unreadable)."""
    import onnx

    try:
        model = onnx.load(str(fp16_model), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        log.warning("cannot read %s: %s", fp16_model, exc)
        return None
    for prop in model.metadata_props:
        if prop.key == SOURCE_SHA_KEY:
            return str(prop.value)
    return None


def is_current(fp16_model: Path, source: Path) -> bool:
    """Whether ``fp16_model`` exists and was made from the ``source`` file as it is now."""
    return fp16_model.is_file() and source_sha256_of(fp16_model) == file_sha256(source)


def _session(model: bytes | str) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def check_inputs(session: Any, batch: int = CHECK_BATCH,
                 seed: int = CHECK_SEED) -> dict[str, np.ndarray]:
    """Seeded inputs for every model input: dynamic dimensions -> ``batch``; floats uniform in
    [0, 1), integers zero."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for arg in session.get_inputs():
        shape = tuple(d if isinstance(d, int) and d > 0 else batch for d in arg.shape)
        dtype = _NUMPY_OF_ORT.get(arg.type)
        if dtype is None:
            raise EngineError(f"input {arg.name} has unsupported type {arg.type}")
        if np.issubdtype(dtype, np.floating):
            out[arg.name] = rng.random(shape, dtype=np.float32).astype(dtype)
        else:
            out[arg.name] = np.zeros(shape, dtype=dtype)
    return out


def max_abs_diff(reference: Any, candidate: Any, inputs: dict[str, np.ndarray]) -> float:
    """Largest |candidate - reference| over all outputs of two ORT sessions on ``inputs``."""
    ref = reference.run(None, inputs)
    got = candidate.run(None, inputs)
    return max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
               for a, b in zip(ref, got, strict=True))


def convert_to_fp16(model_path: Path, out_path: Path | None = None, *,
                    samples: dict[str, np.ndarray] | None = None,
                    tolerance: float = DEFAULT_TOLERANCE) -> Fp16Report:
    """Make, check and write the FP16 variant of ``model_path``.

    ``samples`` are real inputs for the check (default: :func:`check_inputs`). Raises
    :class:`EngineError` if the model cannot be converted or the variant differs from FP32 by
    more than ``tolerance`` (then nothing is written)."""
    import onnx
    from onnxconverter_common import float16

    started = time.monotonic()
    target = out_path or fp16_path(model_path)
    source_sha = file_sha256(model_path)
    try:
        model = onnx.load(str(model_path))
        converted = float16.convert_float_to_float16(model, keep_io_types=True)
    except Exception as exc:  # onnx / onnxconverter_common raise untyped errors
        raise EngineError(f"cannot convert {model_path} to FP16: {exc}") from exc
    del converted.metadata_props[:]
    for prop in model.metadata_props:
        if prop.key != SOURCE_SHA_KEY:
            converted.metadata_props.add(key=prop.key, value=prop.value)
    converted.metadata_props.add(key=SOURCE_SHA_KEY, value=source_sha)
    data = converted.SerializeToString()
    try:
        fp32 = _session(str(model_path))
        fp16 = _session(data)
        inputs = samples if samples is not None else check_inputs(fp32)
        diff = max_abs_diff(fp32, fp16, inputs)
    except EngineError:
        raise
    except Exception as exc:  # ORT raises its own untyped errors
        raise EngineError(f"FP16 variant of {model_path.name} does not run in ONNX Runtime: "
                          f"{exc}") from exc
    batch = int(next(iter(inputs.values())).shape[0]) if inputs else 0
    if not diff <= tolerance:  # also catches NaN
        raise EngineError(f"FP16 variant of {model_path.name} differs from FP32 by {diff:.3g} "
                          f"(> {tolerance}); not written")
    atomic_write_bytes(target, data)
    seconds = time.monotonic() - started
    log.info("wrote %s: max |fp16 - fp32| = %.2e over a batch of %d (%.1f s)", target.name,
             diff, batch, seconds)
    return Fp16Report(model_path, target, source_sha, diff, batch, seconds, True)


def ensure_fp16(model_path: Path, *, fallback_dir: Path | None = None,
                tolerance: float = DEFAULT_TOLERANCE) -> Path:
    """The current FP16 variant of ``model_path``, made if missing or stale.

    Looked for (and written) beside the model; if that directory is read-only (an installed
    package), in ``fallback_dir`` (the engine cache)."""
    candidates = [fp16_path(model_path)]
    if fallback_dir is not None:
        candidates.append(fallback_dir / fp16_path(model_path).name)
    for path in candidates:
        if is_current(path, model_path):
            return path
    last: EngineError | None = None
    for path in candidates:
        try:
            return convert_to_fp16(model_path, path, tolerance=tolerance).target
        except EngineError as exc:
            if isinstance(exc.__cause__, OSError):  # not writable here: try the next place
                log.info("cannot write %s (%s); trying the next location", path, exc.message)
                last = exc
                continue
            raise
    raise last or EngineError(f"no writable place for the FP16 variant of {model_path}")
