"""Who may see the dashboard: the users file, passwords, login rate limiting, the
reverse-proxy mode and CSRF tokens.

Users file: one user a line, ``NAME:ROLE:HASH``, the hash argon2id (argon2-cffi's defaults,
RFC 9106's second recommended parameter set); ``#`` starts a comment. It is written by
``hust19 dashboard add-user`` (atomically, mode 0600) and re-read when it changes, so adding a
user needs no restart. A hash of ``-`` makes a user known in proxy mode only (for the role):
such a user cannot log in with a password.

Proxy mode: the user name comes from ``X-Forwarded-User``, believed only when the TCP peer
is one of the trusted proxies; anything else is anonymous (401). The role is the users file's,
else the configured default.

CSRF: every state-changing request carries a token (a form field or ``X-CSRF-Token``): the
session's own random token, or in proxy mode an HMAC of the user name under the store's secret;
the request's ``Origin``, when sent, must be the dashboard's own.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from agent.dashboard.settings import ROLES
from agent.durable import atomic_write
from schemas.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

USER_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
NO_PASSWORD: Final = "-"  # noqa: S105 - the marker of a proxy-only user
MIN_PASSWORD_LENGTH: Final = 8
MAX_PASSWORD_LENGTH: Final = 1024
LOGIN_MAX_FAILURES: Final = 5
LOGIN_WINDOW_S: Final = 300.0
"""At most this many failed logins per user name and per client address in this window."""
HEADER_NOTE: Final = ("# hust19 dashboard users: NAME:ROLE:HASH (argon2id); written by "
                      "`hust19 dashboard add-user`\n")

_hasher = PasswordHasher()
_DUMMY_HASH: Final = _hasher.hash("not a password: evens out the time of unknown users")


@dataclass(frozen=True)
class User:
    name: str
    role: str
    password_hash: str

    @property
    def can_login(self) -> bool:
        return self.password_hash != NO_PASSWORD


@dataclass(frozen=True)
class Principal:
    """The user of one request."""

    name: str
    role: str
    csrf: str
    via: str  # "session" or "proxy"

    @property
    def can_acknowledge(self) -> bool:
        return self.role == "reader"


def check_user_name(name: str) -> str:
    if not USER_NAME.match(name):
        raise InputError(f"user name {name!r}: use 1-64 of letters, digits and . _ @ - "
                         "(starting with a letter or digit)")
    return name


def hash_password(password: str) -> str:
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise InputError(f"a password needs {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} "
                         "characters")
    return _hasher.hash(password)


def parse_users(text: str, source: str) -> dict[str, User]:
    """The users of a users file's text; :class:`ConfigError` naming the line if malformed."""
    users: dict[str, User] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep1, rest = line.partition(":")
        role, sep2, password_hash = rest.partition(":")
        if not (sep1 and sep2) or not USER_NAME.match(name) or role not in ROLES \
                or not (password_hash == NO_PASSWORD or password_hash.startswith("$argon2")):
            raise ConfigError(f"users file {source} line {number}: expected NAME:ROLE:HASH "
                              f"with ROLE one of {', '.join(ROLES)} and an argon2 hash")
        users[name] = User(name, role, password_hash)
    return users


def format_users(users: dict[str, User]) -> str:
    return HEADER_NOTE + "".join(f"{u.name}:{u.role}:{u.password_hash}\n"
                                 for u in sorted(users.values(), key=lambda u: u.name))


def read_users_file(path: Path) -> dict[str, User]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"users file {path}: {exc}") from exc
    return parse_users(text, str(path))


def add_user(path: Path, name: str, role: str, password: str | None) -> bool:
    """Add or update a user in the users file (``password`` ``None``: proxy-only user);
    returns True if the user is new."""
    check_user_name(name)
    if role not in ROLES:
        raise InputError(f"role {role!r}: one of {', '.join(ROLES)}")
    users = read_users_file(path)
    new = name not in users
    users[name] = User(name, role, hash_password(password) if password is not None
                       else NO_PASSWORD)
    _write_users(path, users)
    return new


def remove_user(path: Path, name: str) -> bool:
    users = read_users_file(path)
    if users.pop(name, None) is None:
        return False
    _write_users(path, users)
    return True


def _write_users(path: Path, users: dict[str, User]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    old_umask = os.umask(0o077)
    try:
        atomic_write(path, format_users(users).encode())
        path.chmod(0o600)
    except OSError as exc:
        raise ConfigError(f"users file {path}: {exc}") from exc
    finally:
        os.umask(old_umask)


class UserDirectory:
    """The users file, re-read when its modification time or size changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, User] = {}
        self.reload()

    def reload(self) -> dict[str, User]:
        with self._lock:
            try:
                st = self.path.stat()
                stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                stamp = None
            if stamp != self._stamp or stamp is None:
                self._users = read_users_file(self.path)
                self._stamp = stamp
            return self._users

    def get(self, name: str) -> User | None:
        return self.reload().get(name)

    def __len__(self) -> int:
        return len(self.reload())

    def verify(self, name: str, password: str) -> User | None:
        """The user if ``password`` is theirs, else ``None`` (as slow for unknown users)."""
        user = self.get(name) if USER_NAME.match(name) else None
        if user is None or not user.can_login or len(password) > MAX_PASSWORD_LENGTH:
            with contextlib.suppress(VerificationError):
                _hasher.verify(_DUMMY_HASH, "x" if len(password) > MAX_PASSWORD_LENGTH
                               else password + "!")
            return None
        try:
            _hasher.verify(user.password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        return user


class LoginLimiter:
    """Failed logins per key in a sliding window (keys: the user name and the client address,
    so neither guessing one account from many places nor many accounts from one place
    works)."""

    def __init__(self, max_failures: int = LOGIN_MAX_FAILURES,
                 window_s: float = LOGIN_WINDOW_S) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._lock = threading.Lock()
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._failures.setdefault(key, deque())
        while q and now - q[0] > self.window_s:
            q.popleft()
        return q

    def retry_after(self, keys: list[str], now: float | None = None) -> float:
        """Seconds until a login may be tried again for these keys (0: now)."""
        now = time.monotonic() if now is None else now
        wait = 0.0
        with self._lock:
            for key in keys:
                q = self._recent(key, now)
                if len(q) >= self.max_failures:
                    wait = max(wait, self.window_s - (now - q[0]))
        return wait

    def failed(self, keys: list[str], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            for key in keys:
                self._recent(key, now).append(now)
            if len(self._failures) > 10_000:  # forget quiet keys
                for key in [k for k, q in self._failures.items() if not q]:
                    del self._failures[key]

    def succeeded(self, keys: list[str]) -> None:
        with self._lock:
            for key in keys:
                self._failures.pop(key, None)


class TrustedProxies:
    """The addresses whose ``X-Forwarded-User`` is believed."""

    def __init__(self, networks: list[str]) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]

    def trusts(self, host: str | None) -> bool:
        if not host:
            return False
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in n for n in self.networks)


def proxy_csrf(secret: str, user: str) -> str:
    """The CSRF token of a proxy-authenticated user (stable per user and store)."""
    return hmac.new(secret.encode(), f"csrf:proxy:{user}".encode(), "sha256").hexdigest()


def tokens_match(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())
