"""``hust19 bus dump``: output shape and error messages, run as a real process."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from agent.bus.embedded import EmbeddedBus
from agent.bus.kafka import KafkaBus
from agent.cli import EXIT_FAILURE, EXIT_USAGE
from tests.fixtures.kafka import free_port, kafka_test_overrides

FIELDS = {"topic", "partition", "offset", "key", "headers", "value_size", "timestamp",
          "timestamp_ms"}


def _hust19(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def _write(producer_bus: EmbeddedBus | KafkaBus, topic: str) -> None:
    producer = producer_bus.producer()
    producer.send(topic, b"1.2.840.1", b"\x00" * 1234, [("study_uid", b"1.2.840"),
                                                         ("schema", b"v1")])
    producer.send(topic, None, b"")
    producer.send(topic, b"1.2.840.1", b"abc")
    producer.flush()
    producer.close()


def _check_lines(stdout: str, topic: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in stdout.splitlines()]
    for line in lines:
        assert set(line) == FIELDS
        assert line["topic"] == topic
        assert str(line["timestamp"]).endswith("Z")
    return lines


def test_dump_embedded_prints_one_json_line_per_message(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "bus")
    _write(bus, "dicom.instances")
    bus.close()
    out = _hust19("bus", "dump", "--topic", "dicom.instances", "--data-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    lines = _check_lines(out.stdout, "dicom.instances")
    assert [(x["offset"], x["key"], x["value_size"]) for x in lines] == [
        (0, "1.2.840.1", 1234), (1, None, 0), (2, "1.2.840.1", 3)]
    assert lines[0]["headers"] == {"study_uid": "1.2.840", "schema": "v1"}
    assert lines[0]["partition"] == 0
    assert "embedded durable log" in out.stderr  # the startup line says which bus

    limited = _hust19("bus", "dump", "--topic", "dicom.instances", "--data-dir", str(tmp_path),
                      "--max", "2")
    assert [json.loads(x)["offset"] for x in limited.stdout.splitlines()] == [0, 1]


@pytest.mark.kafka
def test_dump_kafka_prints_every_partition(kafka_broker: str) -> None:
    topic = f"test-{uuid.uuid4().hex[:12]}"
    bus = KafkaBus([kafka_broker.removeprefix("kafka://")], **kafka_test_overrides())
    bus.ensure_topics([topic], num_partitions=3)
    _write(bus, topic)
    bus.close()
    out = _hust19("bus", "dump", "--topic", topic, "--bus", kafka_broker)
    assert out.returncode == 0, out.stderr
    lines = _check_lines(out.stdout, topic)
    assert sorted(x["value_size"] for x in lines) == [0, 3, 1234]  # type: ignore[type-var]
    keyed = [x for x in lines if x["key"] == "1.2.840.1"]
    assert [x["value_size"] for x in keyed] == [1234, 3]  # one key: one partition, in order


def _one_line_error(out: subprocess.CompletedProcess[str], status: int, text: str) -> None:
    assert out.returncode == status
    assert out.stdout == ""
    errors = [line for line in out.stderr.splitlines() if line.startswith("hust19: error:")]
    assert len(errors) == 1 and text in errors[0], out.stderr
    assert "Traceback" not in out.stderr


def test_dump_missing_data_dir(tmp_path: Path) -> None:
    out = _hust19("bus", "dump", "--topic", "t", "--data-dir", str(tmp_path / "absent"))
    _one_line_error(out, EXIT_USAGE, "does not exist")
    assert not (tmp_path / "absent").exists()  # dump creates nothing


def test_dump_missing_topic(tmp_path: Path) -> None:
    EmbeddedBus(tmp_path / "bus").close()
    out = _hust19("bus", "dump", "--topic", "no.such.topic", "--data-dir", str(tmp_path))
    _one_line_error(out, EXIT_USAGE, "topic no.such.topic does not exist")
    assert not (tmp_path / "bus" / "topics" / "no.such.topic").exists()


@pytest.mark.kafka
def test_dump_missing_kafka_topic(kafka_broker: str) -> None:
    out = _hust19("bus", "dump", "--topic", "no.such.topic", "--bus", kafka_broker)
    _one_line_error(out, EXIT_USAGE, "topic no.such.topic does not exist")


@pytest.mark.slow
def test_dump_broker_down() -> None:
    url = f"kafka://127.0.0.1:{free_port()}"
    out = _hust19("bus", "dump", "--topic", "t", "--bus", url)
    _one_line_error(out, EXIT_FAILURE, "cannot reach the brokers")


def test_dump_bad_bus_url(tmp_path: Path) -> None:
    out = _hust19("bus", "dump", "--topic", "t", "--bus", "amqp://x")
    _one_line_error(out, EXIT_FAILURE, "expected 'embedded' or 'kafka://host:port'")
