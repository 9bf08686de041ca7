"""A real Prometheus and Alertmanager on loopback, for tests.

The process code lives in demo/stack.py (the demo runs the same stack); this module
keeps the tests' import path and public API: Prometheus, Alertmanager, WebhookSink,
Notification, free_port, alertmanager_config_for_test.
"""

from __future__ import annotations

from demo.stack import (
    Alertmanager,
    Notification,
    Program,
    Prometheus,
    WebhookSink,
    alertmanager_config_for_test,
    free_port,
)

__all__ = ["Alertmanager", "Notification", "Program", "Prometheus", "WebhookSink", "alertmanager_config_for_test",
           "free_port"]
