"""Triage: the worker (``worker``) reads a series from the bus, runs the engines, looks up the
patient's labs in the LIS (``lis``, read through ``lis_mapping``), records each result once
(``ledger``), writes the DICOM SR (``sr``, its UIDs from ``uids``) and sends it to the PACS
(``pacs``)."""
