"""Grafana dashboards as code (grafanalib), generated into dashboards/json/.

Lands with issue "Dashboards as code"; nothing here yet.
"""
