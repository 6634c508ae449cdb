"""The dashboard's settings: defaults < TOML ([hust19] then [dashboard]) < env < flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.dashboard.settings import load_dashboard_settings
from schemas.errors import ConfigError


def test_precedence_and_defaults(tmp_path: Path) -> None:
    config = tmp_path / "hust19.toml"
    config.write_text('[hust19]\ndata_dir = "/var/lib/hust19"\nbus = "kafka://k1:9092"\n'
                      'port = 104\n\n[dashboard]\nport = 9000\nauth = "proxy"\n'
                      'trusted_proxy = ["10.0.0.0/8"]\nrole = ["worker=http://w:8081"]\n')
    s = load_dashboard_settings(config, {}, environ={})
    assert s.data_dir == Path("/var/lib/hust19") and s.bus == "kafka://k1:9092"
    assert s.port == 9000 and s.auth == "proxy" and s.trusted_proxy == ["10.0.0.0/8"]
    assert s.role == {"worker": "http://w:8081"}
    assert s.db_url == "sqlite:////var/lib/hust19/dashboard.sqlite"
    assert s.users_file == Path("/var/lib/hust19/dashboard-users.txt")
    s = load_dashboard_settings(config, {"port": 9100},
                                environ={"HUST19_DASHBOARD_PORT": "9050",
                                         "HUST19_DASHBOARD_TRUSTED_PROXY": "192.168.1.5"})
    assert s.port == 9100 and s.trusted_proxy == ["192.168.1.5"]
    d = load_dashboard_settings(None, {}, environ={})
    assert (d.host, d.port, d.auth, d.trusted_proxy) == ("127.0.0.1", 8088, "password",
                                                          ["127.0.0.1"])


@pytest.mark.parametrize(("overrides", "message"), [
    ({"trusted_proxy": ["proxy.example.org"]}, "trusted_proxy"),
    ({"role": ["worker"]}, "role"),
    ({"role": ["worker=ftp://x"]}, "role"),
    ({"tls_cert": Path("c.pem")}, "go together"),
    ({"auth": "ldap"}, "auth"),
])
def test_bad_settings_are_named(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_dashboard_settings(None, overrides, environ={})


def test_lis_default_only_when_the_agent_has_one(tmp_path: Path) -> None:
    s = load_dashboard_settings(None, {"data_dir": tmp_path}, environ={})
    assert s.lis_url is None
    (tmp_path / "lis.sqlite").write_bytes(b"")
    assert s.lis_url == f"sqlite:///{(tmp_path / 'lis.sqlite').resolve()}"
