"""The whole product on one machine, with real peers:

1. loads the demo LIS (SQLite in the data folder) from the iCTCF tables when they are there
   (--ictcf, default ../shared/data/ictcf), linking the sample patient to one iCTCF patient:
   a link made for the demo, not the same person (no public data set pairs CT with lab
   values); without the tables the triage is CT-only and says so;
2. starts dcmtk storescp as the PACS;
3. starts the agent in-process on its embedded defaults (embedded bus, SQLite LIS) with that
   PACS as the SR destination;
4. sends the repository's sample series (samples/lung-pet-ct-dx/Lung_Dx-A0002-B40f, 30
   uncompressed CT slices, CC BY 4.0) with dcmtk storescu;
5. prints the triage result from the topic triage.results and a dsrdump of the SR the PACS
   got.

--data-dir keeps the data (default: a temporary folder, removed at the end); --series sends
another folder.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Final

from agent.app import ALL_ROLES, Agent
from agent.bus.interface import Message
from agent.cli.logs import setup_logging
from agent.config import Settings, load_settings
from schemas import topics
from schemas.errors import Hust19Error, InputError
from schemas.messages import TriageResult, parse_result

logger = logging.getLogger(__name__)

REPO: Final = Path(__file__).resolve().parents[3]
SAMPLE_SERIES: Final = REPO / "samples" / "lung-pet-ct-dx" / "Lung_Dx-A0002-B40f"
DEFAULT_ICTCF: Final = REPO.parent / "shared" / "data" / "ictcf"
DEMO_LINK_ICTCF_ID: Final = "778"
"""The iCTCF patient whose labs the demo links to the sample patient (Liyuan, type1)."""
DEMO_AE: Final = "HUST19"
DEMO_CALLING_AE: Final = "DEMO_SCU"
DEMO_PACS_AE: Final = "DEMO_PACS"
QUIET_S: Final = 1.0
WAIT_S: Final = 180.0
SEND_TIMEOUT_S: Final = 600.0
DCMTK_DIRS: Final = ("/usr/bin", "/usr/local/bin", "/opt/homebrew/bin")


def register(sub: Any) -> None:
    parser = sub.add_parser("demo", help="start the agent, send it a CT series, show the "
                            "triage result and the SR", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, help="keep the agent's data here (default: "
                        "a temporary folder, removed at the end)")
    parser.add_argument("--series", type=Path, default=SAMPLE_SERIES,
                        help="folder of DICOM files to send (default: the repository sample)")
    parser.add_argument("--compressed", action="store_true",
                        help="let storescu propose JPEG Lossless (-xs), for compressed series")
    parser.add_argument("--ictcf", type=Path, default=DEFAULT_ICTCF,
                        help="iCTCF tables for the demo LIS (default: ../shared/data/ictcf)")
    parser.add_argument("--log-level", default="WARNING",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.set_defaults(func=run)


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_dcmtk(tool: str) -> str:
    """dcmtk's ``tool`` (not pynetdicom's script of the same name); ``InputError`` if dcmtk
    is not installed."""
    for directory in DCMTK_DIRS:
        candidate = Path(directory) / tool
        if candidate.is_file():
            return str(candidate)
    found = shutil.which(tool)
    if found is None or "/.venv/" in found or "site-packages" in found:
        raise InputError(f"dcmtk is not installed ({tool} not found): apt-get install -y dcmtk")
    return found


def _wait_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with closing(socket.socket()) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise Hust19Error(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


@contextmanager
def demo_pacs(folder: Path) -> Iterator[int]:
    """dcmtk ``storescp`` as the PACS, storing into ``folder``; yields its port."""
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    proc = subprocess.Popen([find_dcmtk("storescp"), "-od", str(folder), "-aet", DEMO_PACS_AE,
                             "+xa", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_port(port)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


def load_demo_lis(ictcf: Path, data_dir: Path, patient_id: str) -> str:
    """Import the iCTCF tables into the data folder's SQLite LIS with ``patient_id`` linked
    to one iCTCF patient; returns a line saying what was done."""
    if not (ictcf / "patients.csv").is_file():
        return (f"no iCTCF tables at {ictcf}: the LIS stays empty and the triage is CT-only "
                "(pass --ictcf DIR)")
    from agent.cli.commands.lis import import_ictcf

    url = f"sqlite:///{(data_dir / 'lis.sqlite').resolve()}"
    stats = import_ictcf(ictcf, url, aliases={patient_id: DEMO_LINK_ICTCF_ID})
    return (f"demo LIS: {stats.patients} iCTCF patients, {stats.results} lab results; the "
            f"sample's PatientID {patient_id!r} is linked to iCTCF patient "
            f"{DEMO_LINK_ICTCF_ID} (a demo link, not the same person)")


def start_agent(data_dir: Path, pacs_port: int | None = None) -> Agent:
    """The whole agent on ``data_dir``: embedded bus, SQLite LIS, a free DICOM port."""
    settings: Settings = load_settings(None, {
        "data_dir": data_dir, "host": "127.0.0.1", "port": _free_port(), "ae_title": DEMO_AE,
        "allow_ae": [DEMO_CALLING_AE], "bus": "embedded", "series_quiet_s": QUIET_S,
        "pacs": [f"127.0.0.1:{pacs_port}:{DEMO_PACS_AE}"] if pacs_port else []})
    agent = Agent(settings, roles=ALL_ROLES)
    agent.start()
    return agent


def send_series(files: Sequence[Path], port: int, *, compressed: bool = False) -> float:
    """Send ``files`` with dcmtk ``storescu``; returns the seconds it took."""
    cmd = [find_dcmtk("storescu"), "-aet", DEMO_CALLING_AE, "-aec", DEMO_AE,
           *(["-xs"] if compressed else []), "127.0.0.1", str(port), *map(str, files)]
    start = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=SEND_TIMEOUT_S,
                            check=False)
    if result.returncode != 0:
        raise Hust19Error(f"storescu failed (exit {result.returncode}): "
                          f"{result.stderr.strip()[-500:]}")
    return time.monotonic() - start


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


def wait_for_result(agent: Agent, pacs_dir: Path | None,
                    timeout_s: float = WAIT_S) -> tuple[TriageResult, Path | None]:
    """Wait for the first result on ``triage.results`` and, when it names an SR and a PACS
    folder is given, for the SR file at the PACS."""
    deadline = time.monotonic() + timeout_s
    result: TriageResult | None = None
    while time.monotonic() < deadline:
        if result is None:
            messages = read_all(agent, topics.TRIAGE_RESULTS)
            if messages:
                result = parse_result(messages[0].value)
        if result is not None:
            if pacs_dir is None or result.sr_sop_instance_uid is None:
                return result, None
            found = [p for p in pacs_dir.iterdir() if result.sr_sop_instance_uid in p.name]
            if found:
                return result, found[0]
        time.sleep(0.3)
    raise Hust19Error(f"no triage result{' and SR' if result else ''} within {timeout_s:.0f} s")


def describe_quantitative(r: TriageResult) -> list[str]:
    """The quantitative CT lines of a result (empty when the series was not measured)."""
    q = r.quantitative_ct
    if q is None:
        return []

    def fmt(value: float | None, unit: str) -> str:
        return "n/a" if value is None else f"{value:.1f} {unit}" if unit == "ml" else \
            f"{value:.2f} {unit}"

    lines = [f"quantitative CT ({q.slices_with_lung} slices with lung; severity "
             f"{q.severity or 'not measured'}):"]
    for name, m in (("both lungs", q.lungs), ("right lung", q.right), ("left lung", q.left)):
        if m is not None:
            lines.append(f"  {name:10s} volume {fmt(m.volume_ml, 'ml')}, involvement "
                         f"{fmt(m.involvement_percent, '%')} (ground glass "
                         f"{fmt(m.ground_glass_percent, '%')}, consolidation "
                         f"{fmt(m.consolidation_percent, '%')}), well aerated "
                         f"{fmt(m.well_aerated_percent, '%')}")
    lines += [f"  note: {w}" for w in q.warnings]
    return lines


def describe_result(r: TriageResult) -> str:
    """The triage result in readable form."""
    names = {"control": "control (not COVID-19)", "type1": "Type I (mild / regular)",
             "type2": "Type II (severe / critically ill)"}
    lines = [f"study {r.study_uid}", f"series {r.series_uid} ({r.instance_count} instances)"]
    lines += describe_quantitative(r)
    if r.status == "skipped":
        return "\n".join([*lines, f"SKIPPED: {r.skip_reason}"])
    assert r.flag is not None and r.availability is not None
    lines.append(f"FLAG: {names[r.flag]}  [{r.threshold} threshold; general: "
                 f"{r.flag_general}, sensitive: {r.flag_sensitive}]")
    a = r.availability
    for label, scores in ((f"CT ({a.ct_source or 'n/a'})", r.scores.ct),
                          ("patient CNN", r.scores.ct_cnn), ("labs (CF)", r.scores.cf),
                          (f"fused ({a.fusion})", r.scores.fused)):
        if scores is not None:
            lines.append(f"  {label:18s} control {scores.control:.3f}  type1 {scores.type1:.3f}"
                         f"  type2 {scores.type2:.3f}")
    lines.append(f"  modalities: CT {'yes' if a.ct else 'no'}"
                 f"{' (' + a.ct_reason + ')' if a.ct_reason else ''}, labs "
                 f"{'yes' if a.cf else 'no'}{' (' + a.cf_reason + ')' if a.cf_reason else ''};"
                 f" fusion {a.fusion}")
    lines.append(f"  top-10 evidence slices: {len(r.top_slices)}; SR {r.sr_sop_instance_uid}")
    t = r.timings
    if t.last_instance_received and t.series_complete:
        lines.append(f"  last instance -> series complete -> result: "
                     f"{(t.series_complete - t.last_instance_received).total_seconds():.2f} s "
                     f"+ {(t.result_ready - t.series_complete).total_seconds():.2f} s")
    return "\n".join(lines)


def _patient_id(files: Sequence[Path]) -> str:
    import pydicom

    for f in files:
        try:
            return str(pydicom.dcmread(f, stop_before_pixels=True).get("PatientID", "") or "")
        except Exception:  # noqa: S112 (not every file in a folder is DICOM)
            continue
    return ""


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    series = Path(args.series)
    files = sorted(p for p in series.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InputError(f"no files to send in {series}")
    tmp = None if args.data_dir else tempfile.TemporaryDirectory(prefix="hust19-demo-")
    data_dir = Path(args.data_dir) if args.data_dir else Path(tmp.name)  # type: ignore[union-attr]
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        print(load_demo_lis(Path(args.ictcf), data_dir, _patient_id(files)))
        pacs_dir = data_dir / "demo-pacs"
        with demo_pacs(pacs_dir) as pacs_port:
            print(f"PACS: dcmtk storescp as {DEMO_PACS_AE} on 127.0.0.1:{pacs_port}, "
                  f"storing into {pacs_dir}")
            agent = start_agent(data_dir, pacs_port)
            try:
                print(f"agent: {DEMO_AE} on 127.0.0.1:{agent.port}; {agent.bus.describe()}")
                print(f"sending {len(files)} files from {series} with storescu ...")
                seconds = send_series(files, agent.port, compressed=args.compressed)
                print(f"sent in {seconds:.2f} s; waiting for the series to complete "
                      f"({QUIET_S:.0f} s quiet) and the triage ...")
                result, sr = wait_for_result(agent, pacs_dir)
            finally:
                agent.stop()
        print("\n=== triage result (topic triage.results) ===")
        print(describe_result(result))
        if sr is not None:
            print(f"\n=== the SR that arrived at the PACS: {sr.name} (dcmtk dsrdump) ===")
            dump = subprocess.run([find_dcmtk("dsrdump"), str(sr)], capture_output=True,
                                  text=True, timeout=60, check=False)
            print(dump.stdout.rstrip())
            if dump.returncode != 0:
                raise Hust19Error(f"dsrdump rejected the SR: {dump.stderr.strip()}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0
