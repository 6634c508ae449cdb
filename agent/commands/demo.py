"""``hust19 demo``: start the agent in-process, send it a real CT series with dcmtk
``storescu``, wait for the series to complete, and print what arrived on the bus.

By default it uses a temporary data folder (``--data-dir`` keeps it), the embedded bus and a
free port, and sends the repository's sample (``samples/lung-pet-ct-dx/Lung_Dx-A0002-B40f``,
30 uncompressed slices, CC BY 4.0); ``--series DIR`` sends another folder. The steps are
separate functions (:func:`start_agent`, :func:`send_series`, :func:`wait_for_series`,
:func:`summarise`) so that the demo can grow into the full triage demo.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Any, Final

from agent.app import Agent
from agent.bus import Message
from agent.cli import setup_logging
from agent.config import Settings, load_settings
from schemas import topics
from schemas.errors import Hust19Error, InputError
from schemas.messages import SeriesEvent

logger = logging.getLogger(__name__)

SAMPLE_SERIES: Final = (Path(__file__).resolve().parents[2] / "samples" / "lung-pet-ct-dx"
                        / "Lung_Dx-A0002-B40f")
DEMO_AE: Final = "HUST19"
DEMO_CALLING_AE: Final = "DEMO_SCU"
QUIET_S: Final = 1.0
WAIT_S: Final = 120.0
SEND_TIMEOUT_S: Final = 600.0


def register(sub: Any) -> None:
    parser = sub.add_parser("demo", help="start the agent, send it a CT series, show what "
                            "arrived", description=__doc__)
    parser.add_argument("--data-dir", type=Path, help="keep the agent's data here (default: "
                        "a temporary folder, removed at the end)")
    parser.add_argument("--series", type=Path, default=SAMPLE_SERIES,
                        help="folder of DICOM files to send (default: the repository sample)")
    parser.add_argument("--compressed", action="store_true",
                        help="let storescu propose JPEG Lossless (-xs), for compressed series")
    parser.add_argument("--log-level", default="WARNING",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.set_defaults(func=run)


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_storescu() -> str:
    """dcmtk's ``storescu`` (not pynetdicom's script of the same name); ``InputError`` if
    dcmtk is not installed."""
    for directory in ("/usr/bin", "/usr/local/bin", "/opt/homebrew/bin"):
        candidate = Path(directory) / "storescu"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("storescu")
    if found is None or "/.venv/" in found or "site-packages" in found:
        raise InputError("dcmtk is not installed (storescu not found): "
                         "apt-get install -y dcmtk")
    return found


def start_agent(data_dir: Path) -> Agent:
    """The agent on ``data_dir``: embedded bus, a free port on 127.0.0.1, short quiet time."""
    settings: Settings = load_settings(None, {
        "data_dir": data_dir, "host": "127.0.0.1", "port": _free_port(), "ae_title": DEMO_AE,
        "allow_ae": [DEMO_CALLING_AE], "bus": "embedded", "series_quiet_s": QUIET_S})
    agent = Agent(settings)
    agent.start()
    return agent


def send_series(files: Sequence[Path], port: int, *, compressed: bool = False) -> float:
    """Send ``files`` with dcmtk ``storescu``; returns the seconds it took."""
    cmd = [find_storescu(), "-aet", DEMO_CALLING_AE, "-aec", DEMO_AE,
           *(["-xs"] if compressed else []), "127.0.0.1", str(port), *map(str, files)]
    start = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=SEND_TIMEOUT_S,
                            check=False)
    if result.returncode != 0:
        raise Hust19Error(f"storescu failed (exit {result.returncode}): "
                          f"{result.stderr.strip()[-500:]}")
    return time.monotonic() - start


def wait_for_series(agent: Agent, timeout_s: float = WAIT_S) -> list[SeriesEvent]:
    """Wait until every stored instance is published and every series completed; returns the
    series events on the bus."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        spool = agent.spool
        if spool is not None and spool.pending_count() == 0 and not spool.open_series():
            break
        time.sleep(0.2)
    else:
        raise Hust19Error(f"the series did not complete within {timeout_s:.0f} s")
    return [SeriesEvent.model_validate_json(m.value)
            for m in read_all(agent, topics.DICOM_SERIES)]


def read_all(agent: Agent, topic: str) -> list[Message]:
    """Every message on ``topic`` now (read from the beginning, nothing committed)."""
    consumer = agent.bus.consumer(None, [topic])
    out: list[Message] = []
    try:
        while batch := consumer.poll(timeout_s=0.5, max_records=500):
            out += batch
    finally:
        consumer.close()
    return out


def summarise(agent: Agent, events: Sequence[SeriesEvent], sent: int, seconds: float) -> str:
    """What arrived, in readable form."""
    instances = read_all(agent, topics.DICOM_INSTANCES)
    per_series = Counter(m.key.decode() if m.key else "?" for m in instances)
    size = sum(len(m.value) for m in instances)
    lines = [f"sent {sent} files with storescu in {seconds:.2f} s "
             f"({sent / seconds:.1f} instances/s)",
             f"bus: {agent.bus.describe()}",
             f"topic {topics.DICOM_INSTANCES}: {len(instances)} messages, "
             f"{size / 1e6:.1f} MB (Part-10 files as received)"]
    if instances:
        first = instances[0]
        lines.append("  first message headers: " + ", ".join(
            f"{k}={v.decode(errors='replace')}" for k, v in first.headers))
    lines.append(f"topic {topics.DICOM_SERIES}: {len(events)} series-complete events")
    for e in events:
        lines.append(f"  series {e.series_uid}")
        lines.append(f"    study {e.study_uid}, patient {e.patient_id or '-'}, modality "
                     f"{e.modality or '-'}")
        lines.append(f"    {e.instance_count} instances ({per_series.get(e.series_uid, 0)} "
                     f"messages on the bus), generation {e.generation}, reason {e.reason}")
        lines.append(f"    received {e.first_received_at:%H:%M:%S.%f} .. "
                     f"{e.last_received_at:%H:%M:%S.%f} UTC, complete at "
                     f"{e.completed_at:%H:%M:%S.%f}")
    assert agent.spool is not None
    quarantined = list(agent.spool.quarantine_dir.glob("*.json"))
    lines.append(f"quarantined: {len(quarantined)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    series = Path(args.series)
    files = sorted(p for p in series.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InputError(f"no files to send in {series}")
    tmp = None if args.data_dir else tempfile.TemporaryDirectory(prefix="hust19-demo-")
    data_dir = Path(args.data_dir) if args.data_dir else Path(tmp.name)  # type: ignore[union-attr]
    try:
        agent = start_agent(data_dir)
        try:
            print(f"agent listening as {DEMO_AE} on 127.0.0.1:{agent.port}, data in {data_dir}")
            print(f"sending {len(files)} files from {series} ...")
            seconds = send_series(files, agent.port, compressed=args.compressed)
            events = wait_for_series(agent)
            print(summarise(agent, events, len(files), seconds))
        finally:
            agent.stop()
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0
