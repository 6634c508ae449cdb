"""The database fixtures find or start their servers (issue 17, item 2): a URL given in the
environment wins; else the default address if it answers; else a throwaway server, which
serves, and leaves no process, port or folder behind. Each case runs against servers this test
starts itself, so it holds whether or not the machine has PostgreSQL and MariaDB running."""

from __future__ import annotations

import os
import pwd
from contextlib import ExitStack

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from tests.fixtures.databases import (
    ENV_PORT,
    ENV_URL,
    MARIADB,
    ORIGIN_DEFAULT,
    ORIGIN_THROWAWAY,
    POSTGRESQL,
    THROWAWAY,
    DatabaseServer,
    mariadb_database,
    postgres_database,
    resolve_server,
)
from tests.fixtures.dicom import free_port, is_listening

pytestmark = pytest.mark.slow

KINDS = (POSTGRESQL, MARIADB)


def _round_trip(server: DatabaseServer) -> list[tuple[int, str]]:
    """A table written and read back in a database of its own on ``server``."""
    database = postgres_database if server.kind == POSTGRESQL else mariadb_database
    with database(server) as url:
        engine = create_engine(url, poolclass=NullPool)
        try:
            with engine.begin() as conn:
                conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, name VARCHAR(20))"))
                conn.execute(text("INSERT INTO t VALUES (1, 'one'), (2, 'two')"))
            with engine.connect() as conn:
                return [(int(r[0]), str(r[1]))
                        for r in conn.execute(text("SELECT id, name FROM t ORDER BY id"))]
        finally:
            engine.dispose()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("kind", KINDS)
def test_the_order_env_url_then_default_address_then_a_throwaway_server(kind: str) -> None:
    with THROWAWAY[kind]() as running:
        url = running.url.render_as_string(hide_password=False)
        with ExitStack() as stack:
            # 1. a URL in the environment is used as given, before any default
            given = resolve_server(kind, {ENV_URL[kind]: url, ENV_PORT[kind]: "1"}, stack)
            assert given.origin == f"from {ENV_URL[kind]}"
            assert given.url.port == running.url.port
            # 2. without one, a server answering at the default address is used
            default = resolve_server(kind, {ENV_PORT[kind]: str(running.url.port)}, stack)
            assert default.origin == ORIGIN_DEFAULT and default.url.port == running.url.port
            # 3. nothing at the default address: a throwaway server is started
            closed = free_port()
            started = resolve_server(kind, {ENV_PORT[kind]: str(closed)}, stack)
            assert started.origin == ORIGIN_THROWAWAY
            assert started.url.port not in (closed, running.url.port)
            assert _round_trip(started) == [(1, "one"), (2, "two")]
            assert started.pid is not None and started.folder is not None
            assert _alive(started.pid) and is_listening(started.url.port)
        # closing the session's stack stops it and removes its data
        assert not _alive(started.pid)
        assert not is_listening(started.url.port)
        assert not started.folder.exists()
        assert _round_trip(running) == [(1, "one"), (2, "two")]


@pytest.mark.parametrize("kind", KINDS)
def test_a_given_url_that_does_not_answer_fails_and_names_the_variable(kind: str) -> None:
    scheme = "postgresql" if kind == POSTGRESQL else "mysql"
    dead = f"{scheme}://root@127.0.0.1:{free_port()}/test"
    with ExitStack() as stack, pytest.raises(pytest.fail.Exception) as failed:
        resolve_server(kind, {ENV_URL[kind]: dead}, stack)
    assert ENV_URL[kind] in str(failed.value) and "does not answer" in str(failed.value)


def test_the_throwaway_servers_run_as_their_own_users_under_root() -> None:
    """PostgreSQL and MariaDB refuse root: as root the fixture runs them as postgres/mysql
    (as anyone else, as that user)."""
    with THROWAWAY[POSTGRESQL]() as pg, THROWAWAY[MARIADB]() as maria:
        for server, service_user in ((pg, "postgres"), (maria, "mysql")):
            assert server.pid is not None and server.folder is not None
            want = pwd.getpwnam(service_user).pw_uid if os.geteuid() == 0 else os.geteuid()
            assert os.stat(f"/proc/{server.pid}").st_uid == want
            assert os.stat(server.folder).st_uid == want
