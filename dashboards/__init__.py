"""Grafana dashboards as code (grafanalib), generated into dashboards/json/.

One module per dashboard, each with ``build() -> grafanalib.core.Dashboard``; shared
pieces live in ``dashboards.helpers``. ``gpufleet dashboards build`` writes the JSON
(docs/dashboards.md); ``--check`` fails when the committed JSON is stale.
"""

from __future__ import annotations

from dashboards import fabric, fleet, job, node, remediation, storage, usage

# Build order = file order in docs; each module's build() returns one dashboard.
MODULES = (fleet, node, job, fabric, storage, remediation, usage)
