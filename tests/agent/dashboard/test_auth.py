"""Users file, password checks, login rate limiting, trusted proxies, CSRF tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.dashboard.auth import (
    LoginLimiter,
    TrustedProxies,
    UserDirectory,
    add_user,
    parse_users,
    proxy_csrf,
    remove_user,
    tokens_match,
)
from schemas.errors import ConfigError, InputError


def test_users_file_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "users.txt"
    assert add_user(path, "nurse-1", "viewer", "correct horse battery")
    assert not add_user(path, "nurse-1", "reader", "correct horse battery 2")
    text = path.read_text()
    assert text.startswith("#") and "nurse-1:reader:$argon2id$" in text
    with pytest.raises(ConfigError, match="line 2"):
        parse_users("# comment\nbob:admin:$argon2id$x\n", "f")
    with pytest.raises(ConfigError, match="line 1"):
        parse_users("bob:reader:plaintext\n", "f")
    with pytest.raises(InputError, match="user name"):
        add_user(path, "bad:name", "reader", "correct horse battery")
    with pytest.raises(InputError, match="8 to"):
        add_user(path, "carol", "reader", "short")
    assert remove_user(path, "nurse-1") and not remove_user(path, "nurse-1")


def test_verify(tmp_path: Path) -> None:
    path = tmp_path / "users.txt"
    add_user(path, "alice", "reader", "alice-password")
    add_user(path, "pat", "viewer", None)  # proxy-only
    users = UserDirectory(path)
    assert users.verify("alice", "alice-password") is not None
    assert users.verify("alice", "alice-passwordx") is None
    assert users.verify("nobody", "alice-password") is None
    assert users.verify("pat", "-") is None  # no password login for a proxy-only user
    assert users.verify("alice", "x" * 5000) is None
    remove_user(path, "alice")
    assert users.get("alice") is None  # the file is re-read when it changes


def test_login_limiter_window() -> None:
    limiter = LoginLimiter(max_failures=3, window_s=60)
    keys = ["user:alice", "addr:10.0.0.1"]
    for t in (0.0, 1.0):
        limiter.failed(keys, now=t)
    assert limiter.retry_after(keys, now=2.0) == 0
    limiter.failed(keys, now=2.0)
    assert limiter.retry_after(["addr:10.0.0.1"], now=3.0) == pytest.approx(57.0)
    assert limiter.retry_after(["user:bob", "addr:10.0.0.2"], now=3.0) == 0
    assert limiter.retry_after(keys, now=61.5) == 0  # the first failure left the window
    limiter.succeeded(keys)
    assert limiter.retry_after(keys, now=3.0) == 0


def test_trusted_proxies() -> None:
    proxies = TrustedProxies(["127.0.0.1", "10.20.0.0/16"])
    assert proxies.trusts("127.0.0.1") and proxies.trusts("10.20.3.4")
    assert proxies.trusts("::ffff:10.20.3.4")  # IPv4-mapped, as dual-stack sockets report
    assert not proxies.trusts("10.21.0.1") and not proxies.trusts("127.0.0.2")
    assert not proxies.trusts("") and not proxies.trusts(None) and not proxies.trusts("x")


def test_proxy_csrf_tokens() -> None:
    a = proxy_csrf("secret-1", "alice")
    assert a == proxy_csrf("secret-1", "alice") and a != proxy_csrf("secret-1", "bob")
    assert a != proxy_csrf("secret-2", "alice")
    assert tokens_match(a, a) and not tokens_match(a, None) and not tokens_match(a, a[:-1])
