"""Live routing metrics while a MoE model trains: counters, reports, alerts, loop integrations."""

from moescope.monitor.alerts import Alert, AlertRules
from moescope.monitor.metrics import LAYER_METRICS, SUMMARY_STATS, RoutingReport
from moescope.monitor.monitor import RoutingMonitor
from moescope.monitor.sinks import CSVSink, JSONLSink, TensorBoardSink

__all__ = [
    "LAYER_METRICS",
    "SUMMARY_STATS",
    "Alert",
    "AlertRules",
    "CSVSink",
    "JSONLSink",
    "RoutingMonitor",
    "RoutingReport",
    "TensorBoardSink",
]
