"""The bus between ingest and the workers: the interface (``interface``), the implementation
chosen by the bus URL (``factory.open_bus``): the embedded log for one box (``embedded``) or
Apache Kafka (``kafka``), and the worker's commit point (``offsets``)."""
