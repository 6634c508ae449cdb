"""Prometheus metrics of the agent, defined once. Components import the objects they update;
``agent.ops.http`` serves them on ``/metrics``.

A private registry (not prometheus_client's global one) keeps several agents in one test
process apart: each :class:`Metrics` owns its registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """All the agent's metrics on one registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.instances_received = Counter(
            "hust19_instances_received", "DICOM instances stored with Success", registry=r)
        self.instances_rejected = Counter(
            "hust19_instances_rejected", "DICOM instances answered with a failure status",
            ["reason"], registry=r)
        self.associations = Counter(
            "hust19_associations", "DICOM associations by outcome", ["outcome"], registry=r)
        self.connections_refused = Counter(
            "hust19_connections_refused",
            "DICOM connections refused or aborted before or outside an accepted association, "
            "by reason (limits, TLS handshake, ARTIM, PDU length, instance size, bad PDU, "
            "A-ASSOCIATE-RJ)", ["reason"], registry=r)
        self.series_completed = Counter(
            "hust19_series_completed", "series-complete events emitted", registry=r)
        self.results = Counter(
            "hust19_results", "triage results published, by flag (or 'skipped')", ["flag"],
            registry=r)
        self.dlq = Counter("hust19_dlq", "messages sent to the dead-letter topic", registry=r)
        self.sr_sent = Counter(
            "hust19_sr_sent", "SRs stored at a PACS destination", ["destination"], registry=r)
        self.sr_refused = Counter(
            "hust19_sr_refused",
            "SRs a PACS destination refused for good (failure status or association rejected "
            "permanently): sent to the dead-letter topic, not retried", ["destination", "reason"],
            registry=r)
        self.spool_depth = Gauge(
            "hust19_spool_depth", "instances in the spool not yet published to the bus",
            registry=r)
        self.spool_bytes = Gauge(
            "hust19_spool_bytes",
            "bytes the spool's files take on disk (pre-written pool and quarantine included)",
            registry=r)
        self.data_disk_free_bytes = Gauge(
            "hust19_data_disk_free_bytes",
            "free bytes on the file system of the data directory (spool, index, embedded bus)",
            registry=r)
        self.outbox_depth = Gauge(
            "hust19_pacs_outbox_depth", "SR deliveries pending at PACS destinations", registry=r)
        self.consumer_lag = Gauge(
            "hust19_consumer_lag",
            "messages not yet read plus messages read whose work is unfinished", registry=r)
        self.backend = Gauge(
            "hust19_backend_info", "inference backend in use (1 = active)", ["backend"],
            registry=r)
        self.stage_seconds = Histogram(
            "hust19_stage_seconds", "latency per pipeline stage", ["stage"],
            buckets=_LATENCY_BUCKETS, registry=r)

STAGE_INGEST = "ingest"
STAGE_SLICE_INFERENCE = "slice_inference"
STAGE_FUSION = "fusion"
STAGE_SR_SEND = "sr_send"
