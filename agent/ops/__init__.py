"""Operations: ``/healthz``, ``/readyz`` and ``/metrics`` over HTTP (``http``), the Prometheus
metrics every role records (``metrics``) and the installation checks of ``hust19 doctor``
(``doctor``)."""
