"""Engine cache: keys, atomic files, and stale / corrupt entries rebuilt rather than trusted.

These run everywhere: the cache stores opaque plan bytes, so no GPU is needed to check that the
right bytes come back only for the right key.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from pathlib import Path

import pytest

from engines.engine_cache import (
    EngineCache,
    EngineKey,
    ProfileShape,
    atomic_write_bytes,
)
from schemas.errors import EngineError
from tests.fixtures.dicom import wait_for

KEY = EngineKey(
    model_name="slice",
    onnx_sha256="a" * 64,
    trt_version="11.1.0.1",
    gpu_name="NVIDIA H100 80GB HBM3",
    compute_capability="9.0",
    precision="fp16",
    profiles=(ProfileShape("image", (1, 1, 200, 200), (16, 1, 200, 200), (64, 1, 200, 200)),),
    workspace_bytes=1 << 30,
    builder_options=(("strongly_typed", "1"),),
)
PLAN = bytes(range(256)) * 40


def test_digest_is_stable_for_equal_keys() -> None:
    twin = dataclasses.replace(KEY)
    assert twin.digest() == KEY.digest()
    assert len(KEY.digest()) == 64
    # builder option order does not matter: the key is canonical
    a = dataclasses.replace(KEY, builder_options=(("x", "1"), ("y", "2")))
    b = dataclasses.replace(KEY, builder_options=(("y", "2"), ("x", "1")))
    assert a.digest() == b.digest()


@pytest.mark.parametrize("change", [
    {"onnx_sha256": "b" * 64},
    {"trt_version": "10.13.3.9"},
    {"gpu_name": "NVIDIA L4"},
    {"compute_capability": "8.9"},
    {"precision": "fp32"},
    {"workspace_bytes": 1 << 29},
    {"builder_options": (("strongly_typed", "0"),)},
    {"profiles": (ProfileShape("image", (1, 1, 200, 200), (64, 1, 200, 200),
                               (64, 1, 200, 200)),)},
    {"profiles": (ProfileShape("image", (1, 1, 200, 200), (16, 1, 200, 200),
                               (128, 1, 200, 200)),)},
    {"model_name": "patient"},
])
def test_every_key_part_changes_the_digest(change: dict[str, object]) -> None:
    changed = dataclasses.replace(KEY, **change)  # type: ignore[arg-type]
    assert changed.digest() != KEY.digest()
    assert EngineCache(Path("/c")).engine_path(changed) != EngineCache(Path("/c")).engine_path(KEY)


def test_store_then_load_round_trip(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "engines")
    entry = cache.store(KEY, PLAN, build_seconds=12.5)
    assert entry.engine_path == cache.engine_path(KEY)
    assert cache.load(KEY) == PLAN
    side = json.loads(cache.sidecar_path(KEY).read_text())
    assert side["key"] == KEY.parts()
    assert side["plan_size"] == len(PLAN)
    assert side["build_seconds"] == 12.5
    assert side["digest"] == KEY.digest()
    # nothing but the engine and its sidecar is left behind (no temporary files)
    assert sorted(p.name for p in (tmp_path / "engines").iterdir()) == sorted(
        [cache.engine_path(KEY).name, cache.sidecar_path(KEY).name])
    listed = cache.entries()
    assert len(listed) == 1 and listed[0].problem is None and listed[0].plan_size == len(PLAN)


def test_missing_engine_is_a_miss(tmp_path: Path) -> None:
    assert EngineCache(tmp_path).load(KEY) is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_sidecar", "bad_sidecar"])
def test_corrupt_engine_is_discarded(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                     damage: str) -> None:
    cache = EngineCache(tmp_path)
    cache.store(KEY, PLAN, 1.0)
    engine = cache.engine_path(KEY)
    if damage == "flip":
        data = bytearray(engine.read_bytes())
        data[100] ^= 0xFF
        engine.write_bytes(bytes(data))
    elif damage == "truncate":
        engine.write_bytes(PLAN[:-1])
    elif damage == "no_sidecar":
        cache.sidecar_path(KEY).unlink()
    else:
        cache.sidecar_path(KEY).write_text("{not json")
    if damage in ("flip", "truncate"):
        assert cache.entries()[0].problem is not None
    with caplog.at_level(logging.WARNING, logger="engines.engine_cache"):
        assert cache.load(KEY) is None
    assert "discarding" in caplog.text
    assert not engine.exists() and not cache.sidecar_path(KEY).exists()


def test_stale_sidecar_key_is_discarded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = EngineCache(tmp_path)
    cache.store(KEY, PLAN, 1.0)
    side_path = cache.sidecar_path(KEY)
    side = json.loads(side_path.read_text())
    side["key"]["trt_version"] = "10.0.0"  # e.g. an engine file copied from another box
    side_path.write_text(json.dumps(side))
    with caplog.at_level(logging.WARNING, logger="engines.engine_cache"):
        assert cache.load(KEY) is None
    assert "stale" in caplog.text


def test_store_supersedes_older_engine_of_same_model_and_gpu(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    old = dataclasses.replace(KEY, onnx_sha256="0" * 64)
    other_gpu = dataclasses.replace(KEY, gpu_name="NVIDIA L4", compute_capability="8.9")
    other_precision = dataclasses.replace(KEY, precision="fp32")
    for key in (old, other_gpu, other_precision):
        cache.store(key, PLAN, 1.0)
    cache.store(KEY, PLAN, 1.0)
    assert not cache.engine_path(old).exists()
    assert cache.load(other_gpu) == PLAN
    assert cache.load(other_precision) == PLAN
    assert cache.load(KEY) == PLAN
    assert len(cache.entries()) == 3


def test_atomic_write_keeps_old_content_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "plan.engine"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    blocked = tmp_path / "dir.engine"
    (blocked / "child").mkdir(parents=True)  # rename over a non-empty directory fails
    with pytest.raises(EngineError, match="cannot write"):
        atomic_write_bytes(blocked, b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.engine", "plan.engine"]


def test_build_lock_excludes_a_second_builder(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    order: list[str] = []
    inside = threading.Event()

    def second() -> None:
        inside.wait(5)
        with cache.build_lock(KEY):
            order.append("second")

    t = threading.Thread(target=second)
    t.start()
    with cache.build_lock(KEY):
        inside.set()
        lock_file = next(cache.root.glob("*.lock"))
        # the second builder is waiting in flock (the kernel lists it as blocked)
        wait_for(lambda: _blocked_on(lock_file), "the second builder to wait for the lock")
        order.append("first")
    t.join(5)
    assert order == ["first", "second"]


def _blocked_on(path: Path) -> bool:
    """Whether /proc/locks lists a process blocked waiting for a lock on ``path``."""
    inode = os.stat(path).st_ino
    return any("->" in line and line.split()[6].endswith(f":{inode}")
               for line in Path("/proc/locks").read_text().splitlines())
