"""``hust19 engines {build,list,fp16}``: compile, inspect and prepare the GPU engines.

- ``build``: compile the TensorRT engine of every shipped ONNX model for this GPU into the
  engine cache (run at install time, so that the first series does not wait for a build).
  Without a GPU or the ``gpu`` extra it exits non-zero with one plain line saying why.
- ``list``: the engines in the cache, each checked (size and SHA-256 against its sidecar).
- ``fp16``: make and check the FP16 ONNX variants (needs no GPU; ``build`` does this itself
  when asked for FP16).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Final

from agent.cli.commands.common import settings_from_args
from engines import MODELS_DIR
from schemas.errors import BackendUnavailable, EngineError, InputError

_MIB: Final = 1 << 20


def shipped_models(models_dir: Path) -> list[Path]:
    """The FP32 ONNX models in ``models_dir`` (FP16 variants excluded), sorted by name."""
    return sorted(p for p in models_dir.glob("*.onnx") if not p.name.endswith(".fp16.onnx"))


def register(sub: Any) -> None:
    parser = sub.add_parser("engines", help="build and list the TensorRT engines (GPU)")
    inner = parser.add_subparsers(dest="engines_command", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help="TOML settings file")
        p.add_argument("--data-dir", type=Path, help="data directory (default engine cache: "
                                                     "DATA_DIR/engines)")
        p.add_argument("--engine-cache", type=Path, help="engine cache directory")
        p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    build = inner.add_parser("build", help="compile the shipped models for this GPU")
    common(build)
    build.add_argument("--backend", choices=["tensorrt"], default="tensorrt",
                       help="engine kind to build (only TensorRT has an ahead-of-time build)")
    build.add_argument("--precision", choices=["fp32", "fp16"], default="fp16")
    build.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    build.add_argument("--max-batch", type=int, default=64, help="largest batch the engine "
                       "takes (slice network micro-batches)")
    build.add_argument("--workspace-mb", type=int, default=1024,
                       help="TensorRT builder workspace limit")
    build.set_defaults(func=cmd_build)

    lst = inner.add_parser("list", help="show the cached engines")
    common(lst)
    lst.add_argument("--json", action="store_true", help="one JSON object per engine")
    lst.set_defaults(func=cmd_list)

    fp16 = inner.add_parser("fp16", help="make and check the FP16 ONNX variants (CPU)")
    fp16.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    fp16.add_argument("--tolerance", type=float, default=0.01,
                      help="largest accepted |p_fp16 - p_fp32|")
    fp16.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    fp16.set_defaults(func=cmd_fp16)


def _cache_dir(args: argparse.Namespace) -> Path:
    return settings_from_args(args).engine_cache_dir


def cmd_build(args: argparse.Namespace) -> int:
    from engines.tensorrt_backend import TensorRTBackend, probe

    cache_dir = _cache_dir(args)
    if args.max_batch < 1 or args.workspace_mb < 1:
        raise InputError("--max-batch and --workspace-mb must be positive")
    ok, why = probe()
    if not ok:
        raise BackendUnavailable(f"cannot build TensorRT engines here: {why}. The agent runs "
                                 f"on ONNX Runtime (CPU) instead.")
    models = shipped_models(args.models_dir)
    if not models:
        raise InputError(f"no ONNX models in {args.models_dir}")
    print(f"building {args.precision} engines on {why} into {cache_dir}")
    for model in models:
        backend = TensorRTBackend(model, cache_dir=cache_dir, precision=args.precision,
                                  max_batch=args.max_batch, workspace_mb=args.workspace_mb)
        try:
            info = backend.info()
        finally:
            backend.close()
        how = ("from cache" if info["build_seconds"] is None
               else f"built in {info['build_seconds']:.1f} s")
        print(f"{model.name}: {Path(info['engine']).name} ({how})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from engines.engine_cache import EngineCache

    cache_dir = _cache_dir(args)
    entries = EngineCache(cache_dir).entries()
    if args.json:
        for e in entries:
            print(json.dumps({"engine": str(e.engine_path), "key": e.key, "size": e.plan_size,
                              "build_seconds": e.build_seconds, "built_at": e.built_at,
                              "problem": e.problem}))
        return 0
    if not entries:
        print(f"no engines in {cache_dir}")
        return 0
    for e in entries:
        k = e.key
        print(f"{e.engine_path.name}  model={k.get('model_name')} "
              f"precision={k.get('precision')} gpu={k.get('gpu_name')!r} "
              f"sm={k.get('compute_capability')} tensorrt={k.get('trt_version')} "
              f"size={e.plan_size / _MIB:.1f}MiB build={e.build_seconds}s "
              f"built_at={e.built_at} status={e.problem or 'ok'}")
    return 0


def cmd_fp16(args: argparse.Namespace) -> int:
    from agent.cli.logs import setup_logging
    from engines.fp16 import convert_to_fp16

    setup_logging(args.log_level or "WARNING")
    models = shipped_models(args.models_dir)
    if not models:
        raise InputError(f"no ONNX models in {args.models_dir}")
    failed = 0
    for model in models:
        try:
            report = convert_to_fp16(model, tolerance=args.tolerance)
        except EngineError as exc:
            print(f"{model.name}: FAILED: {exc.message}")
            failed += 1
            continue
        print(f"{model.name} -> {report.target.name}: max |p_fp16 - p_fp32| = "
              f"{report.max_abs_diff:.2e} (batch {report.batch}, ONNX Runtime CPU)")
    return 1 if failed else 0
