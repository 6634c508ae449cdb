"""The running HUST-19 triage agent: DICOM ingest, the bus, the worker, LIS, SR and PACS."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hust19-agent")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
