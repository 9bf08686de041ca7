"""Shared building blocks for gpufleet's dashboards (grafanalib 0.7 plus what it lacks).

grafanalib writes dashboards for an old schema (schemaVersion 12, ``datasource`` as a
plain string, ``intervalFactor: 2``) and its newer panels lack options we need (data
links in tables, heatmaps over series, state timelines). Rather than patch each of its
panel classes, every panel here is one small ``Panel`` subclass of grafanalib's base
whose type, options and field config are passed in, so all panels share one
serialisation path: grafanalib's ``panel_json`` plus our overrides, then ``None``
values dropped. The dashboard itself, its templating, links and time range are
grafanalib's own classes.

Conventions every dashboard follows (tests/test_dashboards.py pins them):

* every target reads ``${datasource}`` (a datasource template variable: Prometheus);
* every panel has a description and a unit, ids are assigned in declaration order;
* panels are laid out left to right in the 24-column grid by ``layout``;
* problem tables link an alert name to its runbook and a node to the Node dashboard,
  a job id to the Job dashboard (``var-node`` / ``var-job`` in the URL).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import attr
from grafanalib import core as g
from grafanalib._gen import DashboardEncoder

SCHEMA_VERSION = 39  # Grafana 10.4/11.x; the JSON was checked against grafana-oss 11.3.1
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RUNBOOK_URL = "https://github.com/gpufleet/gpufleet/blob/main/alerts/runbooks/${__data.fields.alertname}.md"

# Dashboard uids (stable; links between dashboards use them).
UID_FLEET = "gpufleet-fleet-overview"
UID_NODE = "gpufleet-node"
UID_JOB = "gpufleet-job"
UID_FABRIC = "gpufleet-fabric"
UID_STORAGE = "gpufleet-storage"
UID_REMEDIATION = "gpufleet-remediation"
UID_USAGE = "gpufleet-usage"

# Label matchers the dashboards' template variables feed.
CLUSTER = 'cluster=~"$cluster"'
NODE = 'node=~"$node"'
GPU = 'gpu=~"$gpu"'

GREEN, ORANGE, RED, BLUE = "green", "orange", "red", "blue"


# ---- links ----------------------------------------------------------------------------------

def node_link(field: str = "node") -> dict[str, Any]:
    return {"title": "Node dashboard for ${__data.fields." + field + "}",
            "url": f"/d/{UID_NODE}?var-datasource=${{datasource}}&var-cluster=${{cluster}}"
                   f"&var-node=${{__data.fields.{field}}}&${{__url_time_range}}"}


def job_link(field: str = "job_id") -> dict[str, Any]:
    return {"title": "Job dashboard for ${__data.fields." + field + "}",
            "url": f"/d/{UID_JOB}?var-datasource=${{datasource}}&var-cluster=${{cluster}}"
                   f"&var-job=${{__data.fields.{field}}}&${{__url_time_range}}"}


def runbook_link() -> dict[str, Any]:
    return {"title": "Runbook for ${__data.fields.alertname}", "url": RUNBOOK_URL, "targetBlank": True}


def dashboard_links(*uids_titles: tuple[str, str]) -> list[g.DashboardLink]:
    return [g.DashboardLink(title=title, uri=f"/d/{uid}", type="link", keepTime=True, includeVars=True,
                            icon="dashboard", tooltip=f"Open {title}") for uid, title in uids_titles]


# ---- targets --------------------------------------------------------------------------------

@attr.s
class Query:
    """One PromQL query of a panel; ``instant`` for tables and stats over "now"."""

    expr: str = attr.ib()
    legend: str = attr.ib(default="")
    instant: bool = attr.ib(default=False)
    table: bool = attr.ib(default=False)

    def target(self, ref_id: str) -> dict[str, Any]:
        return {
            "datasource": DATASOURCE,
            "editorMode": "code",
            "expr": self.expr,
            "format": "table" if self.table else "time_series",
            "instant": self.instant,
            "range": not self.instant,
            "legendFormat": self.legend,
            "refId": ref_id,
        }


def _targets(queries: Sequence[Query | str]) -> list[dict[str, Any]]:
    out = []
    for i, q in enumerate(queries):
        q = Query(q) if isinstance(q, str) else q
        out.append(q.target(chr(ord("A") + i)))
    return out


# ---- panels ---------------------------------------------------------------------------------

@attr.s
class Panel(g.Panel):
    """Any Grafana panel: grafanalib's common fields plus type, options and field config."""

    type_: str = attr.ib(default="timeseries")
    unit: str = attr.ib(default="none")
    options: dict = attr.ib(factory=dict)
    custom: dict = attr.ib(factory=dict)
    defaults: dict = attr.ib(factory=dict)
    overrides: list = attr.ib(factory=list)
    steps: list = attr.ib(factory=list)
    width: int = attr.ib(default=12)
    h: int = attr.ib(default=8)

    def to_json_data(self) -> dict[str, Any]:
        defaults: dict[str, Any] = {
            "unit": self.unit,
            "thresholds": {"mode": "absolute", "steps": self.steps or [{"color": GREEN, "value": None}]},
            "custom": self.custom,
            "links": [],
            **self.defaults,
        }
        res = self.panel_json({
            "type": self.type_,
            "datasource": DATASOURCE,
            "options": self.options,
            "fieldConfig": {"defaults": defaults, "overrides": self.overrides},
        })
        res["fieldConfig"] = {"defaults": defaults, "overrides": self.overrides}  # not deep-merged with base's
        for key in ("height", "span", "minSpan", "error", "editable", "cacheTimeout", "hideTimeOverride",
                    "maxPerRow", "repeat", "repeatDirection", "timeFrom", "timeShift", "interval",
                    "transparent"):
            if res.get(key) in (None, False):
                res.pop(key, None)
        res.pop("maxDataPoints", None)  # grafanalib's 100 would coarsen every graph; Grafana picks by width
        return res


def steps(*pairs: tuple[float | None, str]) -> list[dict[str, Any]]:
    """Threshold steps: (None, base colour), then (value, colour) from that value up."""
    return [{"color": c, "value": v} for v, c in pairs]


def _field_links(links: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"matcher": {"id": "byName", "options": name}, "properties": [{"id": "links", "value": [link]}]}
            for name, link in links.items()]


def stat(title: str, description: str, queries: Sequence[Query | str], unit: str = "none", *,
         thresholds: list | None = None, width: int = 3, h: int = 4, text_mode: str = "value_and_name",
         mappings: list | None = None, color_mode: str = "background") -> Panel:
    """A big number for "now" (instant queries), coloured by thresholds."""
    qs = [Query(q) if isinstance(q, str) else q for q in queries]
    for q in qs:
        q.instant = True
    return Panel(title=title, description=description, targets=_targets(qs), type_="stat", unit=unit,
                 steps=thresholds or [], width=width, h=h,
                 defaults={"mappings": mappings or [], "color": {"mode": "thresholds"}},
                 options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                          "colorMode": color_mode, "graphMode": "none", "justifyMode": "center",
                          "textMode": text_mode, "orientation": "auto", "wideLayout": True,
                          "showPercentChange": False})


def timeseries(title: str, description: str, queries: Sequence[Query | str], unit: str, *,
               width: int = 12, h: int = 8, stack: bool = False, bars: bool = False, min_: float | None = None,
               max_: float | None = None, thresholds: list | None = None) -> Panel:
    custom: dict[str, Any] = {"drawStyle": "bars" if bars else "line", "fillOpacity": 30 if (stack or bars) else 10,
                              "lineWidth": 1, "showPoints": "never", "spanNulls": False,
                              "stacking": {"group": "A", "mode": "normal" if stack else "none"},
                              "thresholdsStyle": {"mode": "line" if thresholds else "off"}}
    defaults: dict[str, Any] = {"color": {"mode": "palette-classic"}}
    if min_ is not None:
        defaults["min"] = min_
    if max_ is not None:
        defaults["max"] = max_
    return Panel(title=title, description=description, targets=_targets(queries), type_="timeseries", unit=unit,
                 custom=custom, defaults=defaults, steps=thresholds or [], width=width, h=h,
                 options={"legend": {"displayMode": "table", "placement": "right", "showLegend": True,
                                     "calcs": ["lastNotNull", "max"]},
                          "tooltip": {"mode": "multi", "sort": "desc"}})


def table(title: str, description: str, queries: Sequence[Query | str], unit: str = "none", *,
          width: int = 12, h: int = 8, links: dict[str, dict[str, Any]] | None = None,
          hide: Iterable[str] = ("Time",), rename: dict[str, str] | None = None,
          units: dict[str, str] | None = None, thresholds: list | None = None, merge: bool | None = None,
          sort_by: str | None = None) -> Panel:
    """Instant table queries: one row per series, labels as columns; several queries merged on labels.

    ``links`` maps a column to a data link (runbook, node or job dashboard); ``units``
    gives columns their own unit (the value columns are called "Value" for one query,
    "Value #A", "Value #B"... for several).
    """
    qs = [Query(q) if isinstance(q, str) else q for q in queries]
    for q in qs:
        q.instant, q.table = True, True
    transformations: list[dict[str, Any]] = []
    if merge if merge is not None else len(qs) > 1:
        transformations.append({"id": "merge", "options": {}})
    transformations.append({"id": "organize", "options": {
        "excludeByName": {name: True for name in sorted(set(hide) | {"__name__"})},
        "renameByName": dict(sorted((rename or {}).items())), "indexByName": {}}})
    overrides = _field_links(links or {})
    for col, u in sorted((units or {}).items()):
        overrides.append({"matcher": {"id": "byName", "options": col}, "properties": [{"id": "unit", "value": u}]})
    options: dict[str, Any] = {"showHeader": True, "cellHeight": "sm", "footer": {"show": False}}
    if sort_by:
        options["sortBy"] = [{"displayName": sort_by, "desc": True}]
    return Panel(title=title, description=description, targets=_targets(qs), type_="table", unit=unit,
                 steps=thresholds or [], transformations=transformations, overrides=overrides, width=width, h=h,
                 custom={"align": "auto", "cellOptions": {"type": "color-text" if thresholds else "auto"},
                         "filterable": True, "inspect": False},
                 options=options)


def heatmap(title: str, description: str, query: Query, unit: str, *, width: int = 12, h: int = 8) -> Panel:
    """One row per series (e.g. per node) over time, cells coloured by value (no bucketing)."""
    query.table = False
    target = query.target("A")
    target["format"] = "heatmap"
    return Panel(title=title, description=description, targets=[target], type_="heatmap", unit=unit, width=width,
                 h=h, options={"calculate": False, "cellGap": 1, "yAxis": {"axisPlacement": "left"},
                               "rowsFrame": {"layout": "auto"},
                               "color": {"mode": "scheme", "scheme": "RdYlGn", "steps": 64, "fill": "dark",
                                         "exponent": 0.5, "reverse": False},
                               "cellValues": {"unit": unit}, "legend": {"show": True},
                               "tooltip": {"mode": "single", "yHistogram": False, "showColorScale": True},
                               "filterValues": {"le": 1e-09}, "showValue": "never"},
                 custom={"hideFrom": {"legend": False, "tooltip": False, "viz": False},
                         "scaleDistribution": {"type": "linear"}})


def state_timeline(title: str, description: str, queries: Sequence[Query | str], unit: str = "none", *,
                   mappings: list | None = None, thresholds: list | None = None, width: int = 12,
                   h: int = 6) -> Panel:
    return Panel(title=title, description=description, targets=_targets(queries), type_="state-timeline",
                 unit=unit, steps=thresholds or [], width=width, h=h,
                 defaults={"mappings": mappings or [], "color": {"mode": "thresholds"}},
                 custom={"fillOpacity": 80, "lineWidth": 0},
                 options={"showValue": "auto", "mergeValues": True, "alignValue": "left", "rowHeight": 0.9,
                          "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                          "tooltip": {"mode": "single", "sort": "none"}})


def value_map(mapping: dict[str, tuple[str, str]]) -> list[dict[str, Any]]:
    """Value -> (text, colour) mappings for stats and state timelines."""
    return [{"type": "value", "options": {k: {"text": t, "color": c, "index": i}
                                          for i, (k, (t, c)) in enumerate(mapping.items())}}]


@attr.s
class Row:
    """A full-width row header (not collapsed) grouping the panels that follow it."""

    title: str = attr.ib()
    description: str = attr.ib(default="")


# ---- dashboards -----------------------------------------------------------------------------

def datasource_var() -> g.Template:
    return g.Template(name="datasource", label="Data source", query="prometheus", type="datasource",
                      default="Prometheus", hide=0, refresh=1)


def query_var(name: str, label: str, query: str, *, multi: bool = True, include_all: bool = True,
              all_value: str | None = ".*", regex: str | None = None) -> g.Template:
    return g.Template(name=name, label=label, query=query, dataSource=DATASOURCE, multi=multi,
                      includeAll=include_all, allValue=all_value if include_all else None, refresh=2, sort=1,
                      regex=regex)


def cluster_var() -> g.Template:
    return query_var("cluster", "Cluster", 'label_values(up{job=~"gpufleet-.*"}, cluster)', multi=False)


def layout(items: Sequence[Panel | Row]) -> list[Panel | dict[str, Any]]:
    """Place panels left to right in the 24-column grid, wrapping; a Row starts a new line.

    Ids are 1, 2, 3... in declaration order, so the JSON is stable across builds.
    """
    out: list[Panel | dict[str, Any]] = []
    x = y = line_h = 0
    next_id = 1
    for item in items:
        if isinstance(item, Row):
            if x:
                y, x, line_h = y + line_h, 0, 0
            out.append({"type": "row", "title": item.title, "id": next_id, "collapsed": False, "panels": [],
                        "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
            next_id += 1
            y += 1
            continue
        if item.width > 24:
            raise ValueError(f"panel {item.title!r} is wider than the grid")
        if x + item.width > 24:
            y, x, line_h = y + line_h, 0, 0
        item.gridPos = g.GridPos(h=item.h, w=item.width, x=x, y=y)
        item.id = next_id
        next_id += 1
        out.append(item)
        x += item.width
        line_h = max(line_h, item.h)
    return out


def dashboard(*, uid: str, title: str, description: str, tags: Sequence[str], variables: Sequence[g.Template],
              items: Sequence[Panel | Row], links: Sequence[tuple[str, str]] = (), time_from: str = "now-6h",
              refresh: str = "1m") -> g.Dashboard:
    return g.Dashboard(
        uid=uid, title=title, description=description, tags=["gpufleet", *tags], timezone="browser",
        panels=layout(items), templating=g.Templating(list=list(variables)), time=g.Time(time_from, "now"),
        refresh=refresh, schemaVersion=SCHEMA_VERSION, links=dashboard_links(*links), editable=True,
        graphTooltip=g.GRAPH_TOOLTIP_MODE_SHARED_CROSSHAIR,
        annotations=g.Annotations(list=[{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
            "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts",
            "type": "dashboard"}]),
    )


def _clean(value: Any) -> Any:
    """Drop None values and grafanalib's legacy top-level keys Grafana 11 ignores."""
    if isinstance(value, dict):  # a threshold step's base "value" stays null, as Grafana writes it
        return {k: _clean(v) for k, v in value.items() if v is not None or k == "value"}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


LEGACY_KEYS = ("__inputs", "gnetId", "hideControls", "rows", "sharedCrosshair", "style", "id")


def render(dash: g.Dashboard) -> str:
    """The dashboard as Grafana JSON text: sorted keys, two-space indent, trailing newline."""
    data = json.loads(json.dumps(dash.to_json_data(), cls=DashboardEncoder))
    for key in LEGACY_KEYS:
        data.pop(key, None)
    data = _clean(data)
    for var in data.get("templating", {}).get("list", []):
        for key in ("useTags", "tagsQuery", "tagValuesQuery", "auto", "auto_min", "auto_count"):
            var.pop(key, None)
        if var.get("type") == "datasource":
            var["current"] = {"selected": False, "text": "Prometheus", "value": "gpufleet-prometheus"}
        else:
            var["current"] = {}
    for link in data.get("links", []):
        link.pop("tags", None)
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
