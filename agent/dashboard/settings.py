"""Settings of the dashboard role, loaded once into one typed object.

Precedence, lowest first: the defaults below < the ``[dashboard]`` table of the TOML file
(``--config``; the agent's ``[hust19]`` table in the same file gives ``data_dir``, ``bus``,
``lis``, ``lis_mapping``, ``lis_window_days`` and the log settings when the dashboard table
does not) < ``HUST19_DASHBOARD_*`` environment variables < command-line flags.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas.errors import ConfigError

ENV_PREFIX: Final = "HUST19_DASHBOARD_"
DEFAULT_PORT: Final = 8088
DEFAULT_GROUP: Final = "hust19-dashboard"
USERS_FILE_NAME: Final = "dashboard-users.txt"
DB_FILE_NAME: Final = "dashboard.sqlite"
SHARED_KEYS: Final = ("data_dir", "bus", "lis", "lis_mapping", "lis_window_days", "log_level",
                      "log_json")
"""Settings the dashboard takes from the agent's ``[hust19]`` table when its own has none."""

Role = Literal["reader", "viewer"]
ROLES: Final = ("reader", "viewer")
"""``reader``: sees everything and acknowledges results; ``viewer``: sees everything."""


class DashboardSettings(BaseModel):
    """Everything the dashboard can be told. The flag is ``--`` + the name with dashes; the
    environment variable ``HUST19_DASHBOARD_`` + the upper-cased name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: Path = Field(Path("hust19-data"), description="The agent's data folder: the "
                           "embedded bus is read there, and the default database and users "
                           "file live there.")
    bus: str = Field("embedded", description="'embedded' (the bus in data_dir) or "
                     "'kafka://host:port[,host:port...]'.")
    consumer_group: str = Field(DEFAULT_GROUP, min_length=1, description="The dashboard's own "
                                "consumer group (every dashboard that keeps its own database "
                                "needs its own group).")
    db: str | None = Field(None, description="SQLAlchemy URL of the dashboard's database; "
                           "default: SQLite file dashboard.sqlite in data_dir.")
    host: str = Field("127.0.0.1", description="Address the web server binds to (0.0.0.0 for "
                      "every interface: then use TLS or a reverse proxy).")
    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="Web server port (0: any free "
                      "port, for tests).")
    auth: Literal["password", "proxy"] = Field("password", description="'password': users log "
                                               "in with the users file; 'proxy': a reverse "
                                               "proxy authenticates and names the user in "
                                               "X-Forwarded-User.")
    users: Path | None = Field(None, description="Users file (NAME:ROLE:ARGON2 HASH lines, "
                               "written by `hust19 dashboard add-user`); default: "
                               "dashboard-users.txt in data_dir.")
    trusted_proxy: list[str] = Field(default_factory=lambda: ["127.0.0.1"], description=
                                     "Addresses or networks (CIDR) whose X-Forwarded-User is "
                                     "believed in proxy mode.")
    proxy_default_role: Role = Field("viewer", description="Role of a proxy-authenticated user "
                                     "who is not in the users file.")
    tls_cert: Path | None = Field(None, description="PEM certificate: serve HTTPS.")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert.")
    session_hours: float = Field(12.0, gt=0, description="A login lasts this long (a shift).")
    idle_minutes: float = Field(60.0, gt=0, description="A session unused this long ends.")
    role: dict[str, str] = Field(default_factory=dict, description="The agent's roles to watch "
                                 "on the IT page, NAME=URL of their health endpoint "
                                 "(http://host:http_port), repeatable.")
    lis: str | None = Field(None, description="SQLAlchemy URL of the LIS, to show the patient's "
                            "lab values; default: the agent's lis.sqlite in data_dir when it "
                            "exists.")
    lis_mapping: Path | None = Field(None, description="TOML mapping of the hospital's LIS "
                                     "(as for the worker).")
    lis_window_days: float = Field(7.0, ge=0, description="Lab values are shown from this many "
                                   "days around the study (as the worker takes them).")
    page_size: int = Field(50, ge=5, le=500, description="Worklist rows per page.")
    retention_days: float = Field(0.0, ge=0, description="Results (with their revisions and "
                                  "thumbnails) ready, and dead letters failed, more than this "
                                  "many days ago are deleted from the dashboard's database "
                                  "(checked every 10 minutes); 0 keeps everything. The "
                                  "acknowledgement audit is kept.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO",
                                                                    description="Log level.")
    log_json: bool = Field(False, description="Write logs as JSON lines.")

    @field_validator("trusted_proxy", mode="before")
    @classmethod
    def _split_proxies(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("trusted_proxy")
    @classmethod
    def _check_proxies(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(f"{item!r} is not an IP address or network") from exc
        return value

    @field_validator("role", mode="before")
    @classmethod
    def _parse_roles(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            out: dict[str, str] = {}
            for item in value:
                name, sep, url = str(item).partition("=")
                if not sep or not name.strip() or not url.strip():
                    raise ValueError(f"{item!r} is not NAME=URL")
                out[name.strip()] = url.strip()
            return out
        return value

    @field_validator("role")
    @classmethod
    def _check_role_urls(cls, value: dict[str, str]) -> dict[str, str]:
        for name, url in value.items():
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"role {name}: {url!r} is not an http(s):// URL")
        return value

    @property
    def db_url(self) -> str:
        """The database URL in force (the SQLite default resolved)."""
        return self.db or f"sqlite:///{(self.data_dir / DB_FILE_NAME).resolve()}"

    @property
    def users_file(self) -> Path:
        return self.users or self.data_dir / USERS_FILE_NAME

    @property
    def lis_url(self) -> str | None:
        """The LIS to read lab values from: the flag, else the agent's default SQLite LIS when
        that file exists (the dashboard never creates it)."""
        if self.lis:
            return self.lis
        default = self.data_dir / "lis.sqlite"
        return f"sqlite:///{default.resolve()}" if default.is_file() else None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def _from_env(environ: dict[str, str]) -> dict[str, Any]:
    return {name: environ[ENV_PREFIX + name.upper()] for name in DashboardSettings.model_fields
            if ENV_PREFIX + name.upper() in environ}


def load_dashboard_settings(config: Path | None = None,
                            overrides: dict[str, Any] | None = None,
                            environ: dict[str, str] | None = None) -> DashboardSettings:
    """Build the settings (see the module docstring for the precedence); raises
    :class:`ConfigError` naming the file, variable or flag."""
    merged: dict[str, Any] = {}
    if config is not None:
        try:
            data = tomllib.loads(config.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {config}: {exc}") from exc
        agent = data.get("hust19", {})
        merged.update({k: agent[k] for k in SHARED_KEYS if k in agent})
        merged.update(data.get("dashboard", {}))
    merged.update(_from_env(dict(os.environ) if environ is None else environ))
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None and v != []})
    try:
        settings = DashboardSettings(**merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"dashboard setting {where!r}: {first['msg']}") from exc
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    return settings
