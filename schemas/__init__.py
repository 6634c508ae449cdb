"""Contracts of the HUST-19 agent: bus topics and message schemas, the LIS data model, the
clinical-feature catalogue and the exception tree shared by ``agent`` and ``engines``."""
