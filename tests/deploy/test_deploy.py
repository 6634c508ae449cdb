"""deploy/: the compose file parses and is wired as documented, the systemd units pass
``systemd-analyze verify``, the Dockerfiles keep their promises (non-root, healthcheck)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from schemas import topics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_services_and_dependencies(compose: dict) -> None:
    services = compose["services"]
    assert {"kafka", "kafka-topics", "lis-db", "ingest", "worker"} <= services.keys()
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    for role in ("ingest", "worker"):
        env = services[role]["environment"]
        assert env["HUST19_BUS"] == "kafka://kafka:9092"
        assert services[role]["depends_on"]["kafka-topics"]["condition"] == \
            "service_completed_successfully"
        assert services[role]["read_only"] is True
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    # volumes used by services are declared
    declared = set(compose["volumes"])
    for svc in services.values():
        for v in svc.get("volumes", []):
            assert v.split(":")[0] in declared


def test_compose_creates_every_topic_with_copartitioned_inputs(compose: dict) -> None:
    script = compose["services"]["kafka-topics"]["command"][0]
    parts = {}
    for topic in topics.ALL_TOPICS:
        line = next(ln for ln in script.splitlines() if f"--topic {topic} " in ln)
        parts[topic] = int(line.split("--partitions ")[1].split()[0])
    assert parts[topics.DICOM_INSTANCES] == parts[topics.DICOM_SERIES]
    assert "max.message.bytes=67108864" in script


def test_compose_holds_no_secret(compose: dict) -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    assert "${LIS_DB_PASSWORD" in text
    assert compose["services"]["lis-db"]["environment"]["POSTGRES_PASSWORD"].startswith("${")


def test_compose_env_names_are_real_settings(compose: dict) -> None:
    from agent.config import Settings

    names = {f"HUST19_{n.upper()}" for n in Settings.model_fields}
    for svc in ("ingest", "worker"):
        for key in compose["services"][svc]["environment"]:
            assert key in names, f"{svc}: {key} is not a setting"


@pytest.mark.parametrize("unit", sorted(p.name for p in (DEPLOY / "systemd").glob("*.service")))
def test_systemd_units_verify(unit: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze missing (Debian package systemd)"
    exe = Path(sys.executable).with_name("hust19")
    assert exe.exists()
    text = (DEPLOY / "systemd" / unit).read_text()
    assert "User=hust19" in text and "NoNewPrivileges=yes" in text
    assert "ProtectSystem=strict" in text and "ReadWritePaths=/var/lib/hust19" in text
    (tmp_path / unit).write_text(text.replace("/opt/hust19/venv/bin/hust19", str(exe)))
    proc = subprocess.run([analyze, "verify", str(tmp_path / unit)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Unknown key" not in proc.stderr and "ignoring" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfiles_non_root_with_healthcheck(name: str) -> None:
    text = (DEPLOY / name).read_text()
    assert "USER hust19" in text
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert 'VOLUME ["/var/lib/hust19"]' in text
