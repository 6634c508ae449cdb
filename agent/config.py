"""Settings, loaded once into one typed object.

Precedence, lowest first: the defaults below < a TOML file (``--config``) < ``HUST19_*``
environment variables < command-line flags. Every field's description is the documentation
(``deploy/hust19.example.toml`` is generated from it).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas.errors import ConfigError

ENV_PREFIX = "HUST19_"
KIB = 1024
KAFKA_SESSION_TIMEOUT_MS = 6000
"""A dead worker's partitions move after this (Apache Kafka's group.min.session.timeout.ms
default is 6000: brokers refuse less). Measured with the test broker (bench/kafka_group.py):
failover 9.3-10.2 s, a joining member stalls the others 3.1-3.2 s (kafka-python's 45 s
default: 69 s and 24 s in issue 20)."""
KAFKA_HEARTBEAT_INTERVAL_MS = 500
KAFKA_MAX_POLL_INTERVAL_MS = 30000


class PacsDestination(BaseModel):
    """A DICOM Storage SCP that receives the SRs, written ``HOST:PORT:AET``."""

    model_config = ConfigDict(frozen=True)

    host: str
    port: int = Field(ge=1, le=65535)
    ae_title: str = Field(min_length=1, max_length=16)

    @classmethod
    def parse(cls, text: str) -> PacsDestination:
        """Parse ``HOST:PORT:AET``; raises :class:`ConfigError` naming the text."""
        parts = text.rsplit(":", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            raise ConfigError(f"PACS destination {text!r} is not HOST:PORT:AET")
        try:
            return cls(host=parts[0], port=int(parts[1]), ae_title=parts[2])
        except ValidationError as exc:
            raise ConfigError(f"PACS destination {text!r}: {exc.errors()[0]['msg']}") from exc

    def __str__(self) -> str:
        return f"{self.host}:{self.port}:{self.ae_title}"


class Settings(BaseModel):
    """Everything the agent can be told. Field names are the TOML keys; the env var is
    ``HUST19_`` + the upper-cased name; the flag is ``--`` + the name with dashes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Storage
    data_dir: Path = Field(Path("hust19-data"), description="Where the spool, the quarantine, "
                           "the embedded bus, the SR outbox and the default SQLite LIS live.")
    # DICOM listener
    host: str = Field("0.0.0.0", description="Address the DICOM listener binds to.")  # noqa: S104
    port: int = Field(11112, ge=1, le=65535, description="DICOM listener port.")
    ae_title: str = Field("HUST19", min_length=1, max_length=16,
                          description="The agent's own AE title (Called AE).")
    allow_ae: list[str] = Field(default_factory=list, description="Calling AE titles allowed to "
                                "send; empty accepts any AE (logged as a warning at start).")
    tls_cert: Path | None = Field(None, description="PEM certificate: enables TLS for DICOM.")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert.")
    tls_ca: Path | None = Field(None, description="PEM CA bundle: when set, clients must present "
                                "a certificate signed by it.")
    require_called_ae: bool = Field(True, description="Refuse an association whose Called AE "
                                    "title is not ae_title (A-ASSOCIATE-RJ, called AE title not "
                                    "recognised); false accepts any Called AE.")
    max_associations: int = Field(32, ge=1, description="Connections to the DICOM listener at "
                                  "once, TLS handshakes and connections not yet associated "
                                  "included; one more is closed at once (logged).")
    max_associations_per_peer: int = Field(16, ge=1, description="Connections at once from one "
                                           "IP address; one more is closed at once (logged).")
    artim_timeout_s: float = Field(10.0, gt=0, description="ARTIM: a connection that sends no "
                                   "A-ASSOCIATE-RQ within this many seconds is closed (also the "
                                   "ACSE timeout).")
    tls_handshake_timeout_s: float = Field(5.0, gt=0, description="A TLS handshake must be over "
                                           "within this many seconds (it runs in the "
                                           "connection's own thread, never the accept thread).")
    dicom_idle_timeout_s: float = Field(60.0, gt=0, description="An association that sends "
                                        "nothing for this many seconds is aborted; a PDU whose "
                                        "bytes stop arriving this long closes the connection.")
    max_instance_mib: int = Field(512, ge=1, description="Largest C-STORE dataset received, in "
                                  "MiB; a larger one aborts the association (it would be held "
                                  "in memory whole). The Kafka bus carries at most 64 MiB.")
    series_quiet_s: float = Field(3.0, gt=0, description="A series is complete when quiet this "
                                  "long after its association was released.")
    series_aborted_quiet_s: float = Field(120.0, gt=0, description="A series whose last "
                                          "association was aborted (or that was open when the "
                                          "agent stopped) is complete only when quiet this "
                                          "long, so a resumed send gives one result.")
    series_max_quiet_s: float = Field(60.0, gt=0, description="A series is complete when quiet "
                                      "this long, association or not.")
    spool_retention_h: float = Field(24.0, ge=0, description="A spooled file is deleted this "
                                     "many hours after it was published to the bus (its index "
                                     "row stays, so a re-sent instance is still recognised); "
                                     "0 keeps every file.")
    spool_pool_files: int = Field(256, ge=0, description="Spool files pre-written ahead of time "
                                  "(zeros, flushed) while no instance arrives, so that storing "
                                  "one costs a data-only flush instead of a journal commit; "
                                  "0 turns this off.")
    spool_pool_file_kib: int = Field(576, ge=8, description="Size of a pre-written spool file in "
                                     "KiB: fits a 512x512 16-bit CT instance. Instances more "
                                     "than this, or less than half of it, take the slower path.")
    # Bus
    bus: str = Field("embedded", description="'embedded' (durable, one box) or "
                     "'kafka://host:port[,host:port...]'.")
    kafka_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "none", description="Compression of produced Kafka messages (DICOM is often compressed "
        "already).")
    bus_retention_h: float = Field(168.0, ge=0, description="Embedded bus: a closed log "
                                   "segment is deleted once its newest message is this many "
                                   "hours old and every consumer group that committed on its "
                                   "topic has read past it (Kafka's retention.ms; a Kafka bus "
                                   "keeps its topics' own setting); 0 keeps everything.")
    consumer_group: str = Field("hust19-worker", description="Kafka consumer group of workers.")
    kafka_session_timeout_ms: int = Field(KAFKA_SESSION_TIMEOUT_MS, ge=1000,
                                          description="Kafka: a worker that sends no heartbeat "
                                          "this long is declared dead and its partitions "
                                          "(series) go to the others (brokers refuse less than "
                                          "their group.min.session.timeout.ms, 6000 by "
                                          "default).")
    kafka_heartbeat_interval_ms: int = Field(KAFKA_HEARTBEAT_INTERVAL_MS, ge=100,
                                             description="Kafka: heartbeat period; also how soon "
                                             "a member learns that a rebalance started.")
    kafka_max_poll_interval_ms: int = Field(KAFKA_MAX_POLL_INTERVAL_MS, ge=1000,
                                            description="Kafka: a worker that does not poll "
                                            "this long leaves the group; also the longest a "
                                            "rebalance waits for a member to rejoin.")
    kafka_instance_id: str | None = Field(None, description="Kafka static membership "
                                          "(group.instance.id): a stable, unique name per "
                                          "worker; a worker restarted with the same name within "
                                          "the session timeout gets its partitions back without "
                                          "a rebalance. Unset: dynamic membership.")
    # Worker
    lis: str | None = Field(None, description="SQLAlchemy URL of the LIS; default: SQLite file "
                            "lis.sqlite in data_dir.")
    lis_mapping: Path | None = Field(None, description="TOML file mapping the hospital's own "
                                     "LIS tables or SQL query and test codes onto the "
                                     "clinical-feature catalogue; default: the reference schema.")
    lis_window_days: float = Field(7.0, ge=0, description="Lab results are taken from this many "
                                   "days before and after the study date.")
    lis_retry_s: float = Field(0.0, ge=0, description="If > 0, retry a failed or empty LIS "
                               "lookup after this many seconds and re-issue the result.")
    pacs: list[PacsDestination] = Field(default_factory=list, description="Where SRs are sent, "
                                        "HOST:PORT:AET, repeatable.")
    pacs_tls: bool = Field(False, description="Send SRs to the PACS over TLS (1.2 or later), "
                           "checking the PACS certificate against pacs_tls_ca (else the system's "
                           "CAs) and its host name; the agent presents tls_cert / tls_key when "
                           "they are set (for a PACS that requires client certificates).")
    pacs_tls_ca: Path | None = Field(None, description="PEM CA bundle that signed the PACS "
                                     "certificates (with pacs_tls); default: the system's CAs.")
    threshold: Literal["general", "sensitive"] = Field("general", description="Which decision "
                                                        "threshold sets the flag.")
    backend: Literal["auto", "onnxruntime", "tensorrt"] = Field(
        "auto", description="Inference backend; auto = TensorRT when a GPU is usable.")
    series_volume_mib: int = Field(512, ge=16, description="The quantitative CT keeps each "
                                   "slice's HU (0.5 MiB per 512 x 512 slice) until the series "
                                   "completes; a series larger than this is not measured (its "
                                   "CT side says why). Measuring takes about 2.5 to 3.5 "
                                   "times the series' HU more, briefly.")
    worker_volume_mib: int = Field(1024, ge=16, description="HU the worker keeps in all, "
                                   "over every series arriving at once and the finished ones "
                                   "kept for late instances: past it the finished ones are "
                                   "released first, then the largest arriving series is not "
                                   "measured (its CT side says why).")
    ct_source: Literal["quantitative", "patient_cnn"] = Field(
        "quantitative", description="Which model gives the CT scores the fusion uses: the "
        "quantitative CT (lung involvement in HU) or the HUST-19 patient CNN (a site-trained "
        "option; it is reported beside the quantitative CT either way).")
    engine_cache: Path | None = Field(None, description="TensorRT engine cache; default "
                                      "data_dir/engines.")
    # Operations
    http_port: int = Field(0, ge=0, le=65535, description="Port of /healthz, /readyz and "
                           "/metrics; 0 disables the HTTP endpoint.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO",
                                                                    description="Log level.")
    log_json: bool = Field(False, description="Write logs as JSON lines.")

    @field_validator("pacs", mode="before")
    @classmethod
    def _parse_pacs(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if isinstance(value, list):
            return [PacsDestination.parse(v) if isinstance(v, str) else v for v in value]
        return value

    @field_validator("allow_ae", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @property
    def lis_url(self) -> str:
        """The LIS URL in force (the SQLite default resolved)."""
        return self.lis or f"sqlite:///{(self.data_dir / 'lis.sqlite').resolve()}"

    @property
    def max_instance_bytes(self) -> int:
        """The largest C-STORE dataset received, in bytes."""
        return self.max_instance_mib * KIB * KIB

    @property
    def kafka_client_settings(self) -> dict[str, Any]:
        """The kafka-python settings these fields stand for (see :mod:`agent.bus.kafka`)."""
        out: dict[str, Any] = {"session_timeout_ms": self.kafka_session_timeout_ms,
                               "heartbeat_interval_ms": self.kafka_heartbeat_interval_ms,
                               "max_poll_interval_ms": self.kafka_max_poll_interval_ms}
        if self.kafka_instance_id:
            out["group_instance_id"] = self.kafka_instance_id
        return out

    @property
    def spool_pool_file_bytes(self) -> int:
        """The size of a pre-written spool file in bytes."""
        return self.spool_pool_file_kib * KIB

    @property
    def engine_cache_dir(self) -> Path:
        return self.engine_cache or self.data_dir / "engines"


def _from_env(environ: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in Settings.model_fields:
        key = ENV_PREFIX + name.upper()
        if key in environ:
            out[name] = environ[key]
    return out


def load_settings(config: Path | None = None, overrides: dict[str, Any] | None = None,
                  environ: dict[str, str] | None = None) -> Settings:
    """Build the settings: defaults < TOML file < ``HUST19_*`` env < ``overrides`` (CLI flags,
    ``None`` values ignored). Raises :class:`ConfigError` naming the file or variable."""
    merged: dict[str, Any] = {}
    if config is not None:
        try:
            data = tomllib.loads(config.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {config}: {exc}") from exc
        merged.update(data.get("hust19", data))
    merged.update(_from_env(dict(os.environ) if environ is None else environ))
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None and v != []})
    try:
        return Settings(**merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"setting {where!r}: {first['msg']} (got {first.get('input')!r})") \
            from exc


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(str(v)) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def example_toml(flags: Mapping[str, Sequence[str]]) -> str:
    """The example settings file: every setting with what it does, its default, its env
    variable and its command-line flags, ``flags`` (setting name -> flags: what the commands'
    parser accepts, ``agent.cli.commands.common.settings_flags``); settings without a default
    value are shown commented out."""
    lines = [
        "# HUST-19 agent settings (generated by `hust19 config example`; do not edit by hand).",
        "# Precedence: defaults < this file (--config) < HUST19_* environment < command-line "
        "flags.",
        "",
        "[hust19]",
    ]
    for name, field in Settings.model_fields.items():
        lines.append("")
        lines.append(f"# {field.description}")
        lines.append(f"# env: {ENV_PREFIX}{name.upper()}   flag: {' / '.join(flags[name])}")
        default = field.get_default(call_default_factory=True)
        if default is None or default == []:
            example = {"tls_cert": '"/etc/hust19/tls/agent.crt"',
                       "tls_key": '"/etc/hust19/tls/agent.key"',
                       "tls_ca": '"/etc/hust19/tls/hospital-ca.crt"',
                       "allow_ae": '["CT_SCANNER1", "CT_SCANNER2"]',
                       "pacs": '["pacs.example.org:104:PACS"]',
                       "lis": '"postgresql+psycopg://hust19@lis-db.example.org/lis"',
                       "engine_cache": '"/var/lib/hust19/engines"',
                       "lis_mapping": '"/etc/hust19/lis-mapping.toml"',
                       "kafka_instance_id": '"worker-1"'}.get(name, '""')
            lines.append(f"# {name} = {example}")
        else:
            lines.append(f"{name} = {_toml_value(default)}")
    return "\n".join(lines) + "\n"
