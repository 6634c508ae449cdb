"""Settings precedence (defaults < TOML < env < flags), errors, and the generated example."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import main
from agent.cli.commands.common import settings_flags
from agent.config import PacsDestination, example_toml, load_settings
from schemas.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text('[hust19]\nport = 2000\nae_title = "FROMFILE"\nseries_quiet_s = 9.5\n')
    env = {"HUST19_PORT": "3000", "HUST19_ALLOW_AE": "CT1, CT2"}
    s = load_settings(cfg, {"port": 4000, "ae_title": None}, environ=env)
    assert s.port == 4000  # flag beats env and file
    assert s.ae_title == "FROMFILE"  # file beats default, None flag ignored
    assert s.allow_ae == ["CT1", "CT2"]  # env list, comma separated
    assert s.series_quiet_s == 9.5
    assert load_settings(environ={}).port == 11112


def test_pacs_destinations_parse_and_reject() -> None:
    s = load_settings(overrides={"pacs": ["10.0.0.5:104:PACS", "pacs.local:11112:ARCH"]},
                      environ={})
    assert s.pacs == [PacsDestination(host="10.0.0.5", port=104, ae_title="PACS"),
                      PacsDestination(host="pacs.local", port=11112, ae_title="ARCH")]
    with pytest.raises(ConfigError, match="HOST:PORT:AET"):
        load_settings(overrides={"pacs": ["nohost"]}, environ={})


def test_bad_values_name_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="port"):
        load_settings(environ={"HUST19_PORT": "not-a-port"})
    with pytest.raises(ConfigError, match="bogus"):
        cfg = tmp_path / "b.toml"
        cfg.write_text("[hust19]\nbogus = 1\n")
        load_settings(cfg, environ={})
    with pytest.raises(ConfigError, match=r"b\.toml"):
        (tmp_path / "b.toml").write_text("[hust19\n")
        load_settings(tmp_path / "b.toml", environ={})


def test_example_config_is_generated_and_loads() -> None:
    checked_in = REPO / "deploy" / "hust19.example.toml"
    assert checked_in.read_text() == example_toml(settings_flags()), \
        "example drifted: run `hust19 config example > deploy/hust19.example.toml`"
    s = load_settings(checked_in, environ={})
    assert s == load_settings(environ={})
    for name in type(s).model_fields:
        assert f"HUST19_{name.upper()}" in checked_in.read_text()


def test_cli_reports_config_error_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["config", "show", "--pacs", "broken"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "HOST:PORT:AET" in err and "Traceback" not in err
