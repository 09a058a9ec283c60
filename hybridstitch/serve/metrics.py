"""The model's own Prometheus metrics, served by Triton next to its own on the metrics port.

Triton's request and compute durations end when ``execute`` returns, and here that is before the
image exists (each response is sent later by its request's sender), so they measure the
hand-off only. The time from the model receiving a request to its response is measured here:

    hybridstitch_request_duration_seconds{instance, outcome="success"|"failure"}   histogram
    hybridstitch_requests_in_flight{instance}                                      gauge

Add Triton's ``nv_inference_queue_duration_us`` (the wait before the model) for end to end.
"""

from __future__ import annotations

BUCKETS_S = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]


class ModelMetrics:
    def __init__(self, pb, instance: str):
        # The families must outlive their metrics (the backend refuses the other order), so both are kept.
        self._duration_family = pb.MetricFamily(
            name="hybridstitch_request_duration_seconds", kind=pb.MetricFamily.HISTOGRAM,
            description="seconds from the hybridstitch model receiving a request to sending its response")
        self._in_flight_family = pb.MetricFamily(
            name="hybridstitch_requests_in_flight", kind=pb.MetricFamily.GAUGE,
            description="requests the hybridstitch model instance holds in its runner")
        self._duration = {outcome: self._duration_family.Metric(labels={"instance": instance, "outcome": outcome},
                                                                buckets=BUCKETS_S)
                          for outcome in ("success", "failure")}
        self._in_flight = self._in_flight_family.Metric(labels={"instance": instance})

    def submitted(self) -> None:
        self._in_flight.increment(1)

    def answered(self, seconds: float, ok: bool, was_submitted: bool = True) -> None:
        if was_submitted:
            self._in_flight.increment(-1)
        self._duration["success" if ok else "failure"].observe(seconds)
