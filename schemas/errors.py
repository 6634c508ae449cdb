"""One exception root for the whole product.

``schemas`` is the layer both ``agent`` and ``engines`` import, so the tree lives here::

    Hust19Error
    ├── ConfigError          settings file, env var or flag that cannot be used
    ├── InputError           bad input from outside: a DICOM file, a CSV row, a CLI argument
    │   └── DicomInputError  a dataset that cannot be parsed or lacks what triage needs
    ├── BusError             the message bus (embedded or Kafka) failed
    ├── LisError             the laboratory information system could not be queried
    ├── PacsError            a DICOM destination refused or could not be reached
    └── EngineError          a model file, backend or computation failed
        └── BackendUnavailable  an inference backend cannot run on this machine

Third-party exceptions are translated where they enter (``raise XError(...) from exc``) so that
callers only ever handle this tree. An error may carry the raw input that caused it
(``payload``) so that a dead-letter entry can keep the original message.
"""

from __future__ import annotations


class Hust19Error(Exception):
    """Root of every error the product raises on purpose."""

    def __init__(self, message: str, *, payload: bytes | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.payload = payload


class ConfigError(Hust19Error):
    """A setting cannot be used (wrong type, unknown name, unreadable file)."""


class InputError(Hust19Error):
    """Input from outside the product is unusable; the message says which file and field."""


class DicomInputError(InputError):
    """A DICOM dataset cannot be parsed, or lacks a UID, pixel data or geometry triage needs."""


class BusError(Hust19Error):
    """The message bus could not store, deliver or commit."""


class LisError(Hust19Error):
    """The LIS could not be reached or answered something unusable."""


class PacsError(Hust19Error):
    """A DICOM destination could not be reached or refused an object."""


class EngineError(Hust19Error):
    """A model file, an inference backend or a computation failed."""


class BackendUnavailable(EngineError):
    """An inference backend cannot run here (no GPU, package missing, engine build failed)."""


class StorageError(Hust19Error):
    """A durable local store (spool, outbox, result ledger) could not be read or written."""
