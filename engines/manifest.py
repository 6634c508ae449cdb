"""Checksums of the shipped model files (``engines/models/MANIFEST.json``).

``python -m engines.manifest`` rewrites the manifest after a retraining; ``hust19 doctor`` and
the test suite verify it, so a model file changed without its manifest (or damaged on disk) is
noticed. FP16 variants and engine caches are build products and not listed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Final

from engines import MODELS_DIR
from engines.inference import file_sha256

MANIFEST_NAME: Final = "MANIFEST.json"
SHIPPED_SUFFIXES: Final = (".onnx", ".json")


def shipped_files(models_dir: Path = MODELS_DIR) -> list[Path]:
    """The files that ship with the package (weights and their metadata)."""
    return sorted(p for p in models_dir.iterdir()
                  if p.is_file() and p.suffix in SHIPPED_SUFFIXES and p.name != MANIFEST_NAME
                  and not p.name.endswith(".fp16.onnx"))


def build(models_dir: Path = MODELS_DIR) -> dict[str, object]:
    return {"algorithm": "sha256",
            "files": {p.name: file_sha256(p) for p in shipped_files(models_dir)}}


def verify(models_dir: Path = MODELS_DIR) -> list[str]:
    """Problems found (empty = every listed file present with its checksum, none unlisted)."""
    path = models_dir / MANIFEST_NAME
    if not path.is_file():
        return [f"{path} missing"]
    listed: dict[str, str] = json.loads(path.read_text())["files"]
    problems = []
    for name, digest in listed.items():
        f = models_dir / name
        if not f.is_file():
            problems.append(f"{name} missing")
        elif file_sha256(f) != digest:
            problems.append(f"{name} checksum differs from the manifest")
    problems += [f"{p.name} not in the manifest" for p in shipped_files(models_dir)
                 if p.name not in listed]
    return problems


def main() -> int:
    doc = build()
    (MODELS_DIR / MANIFEST_NAME).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(f"{MODELS_DIR / MANIFEST_NAME}: {len(doc['files'])} files")  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
