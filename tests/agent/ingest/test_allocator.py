"""The allocator tuning of the long-running commands."""

from __future__ import annotations

import platform

import pytest

from agent.ingest.allocator import OPERATOR_VARIABLES, tune_for_large_buffers


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_glibc_takes_the_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OPERATOR_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert tune_for_large_buffers() is True


def test_the_operators_own_settings_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert tune_for_large_buffers() is False
