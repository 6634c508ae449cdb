"""Ingest: DICOM in, durably, then onto the bus.

A scanner's C-STORE reaches the Storage SCP (``scp``), which takes a connection only within
the listener's bounds (``guard``; enforced inside pynetdicom by ``pynetdicom_replacements``),
checks each instance (``instance``, walking the encoded dataset with ``element_scan``),
answers with a named status (``status``) only after the spool (``spool``) has the Part-10
file on disk. The outbox (``outbox``) publishes spooled instances to the bus and the series
tracker (``series``) announces a series once it is complete. ``allocator`` tunes the C
allocator for the listener's half-megabyte buffers.
"""
