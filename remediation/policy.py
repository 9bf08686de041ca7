"""The remediation policy: which alert leads to which action, and the guardrail knobs.

The policy is a YAML file (shipped: ``alerts/remediation-policy.yml``; reference:
``docs/remediation.md``). It is validated completely at load time, because a policy
mistake found at 3 a.m. by a storm of alerts is how peers' tools drained whole
clusters: unknown keys, wrong types, bad durations, bad regexes, template typos and
over-broad rules are all errors that name the file, the rule (index and name) and the
key. Nothing here talks to a scheduler or a database; the engine applies the policy.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from remediation.actuators.base import REASON_PREFIX

ACTIONS = ("drain", "reboot", "notify", "exec")
# Actions that take a node out of service: capped, rate limited, behind the breaker.
CAPACITY_ACTIONS = ("drain", "reboot")
# Actions that change something outside gpufleet (dry-run skips them, the breaker blocks them).
MUTATING_ACTIONS = ("drain", "reboot", "exec")

# The names a reason template may use (str.format fields). ``labels`` and
# ``annotations`` are indexed: ``{labels[gpu]}``, ``{annotations[summary]}``.
TEMPLATE_FIELDS = ("alertname", "node", "status", "fingerprint", "startsAt", "rule", "action", "labels", "annotations")
DEFAULT_REASON = "{alertname} on {node}"
MAX_REASON_CHARS = 240

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_DURATION = re.compile(r"^(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$")
_DURATION_UNITS = (7 * 86400, 86400, 3600, 60, 1, 0.001)
# Characters that make a plain (equality) match value look like a regex someone forgot to mark.
_REGEX_HINT = re.compile(r"[*|^$+?\\]|\.\*|\[.*\]")


class PolicyError(ValueError):
    """The policy file is invalid. The message names the file, the rule and the key."""


def parse_duration(value: Any) -> float:
    """Prometheus-style duration ("90s", "30m", "1h30m", "2d", "0") -> seconds.

    Raises ValueError for anything else, including bare numbers: "300" could mean
    seconds or minutes to the person who wrote it, "5m" cannot.
    """
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f"expected a duration string like '30m', got {value!r}")
    text = value.strip()
    if text == "0":
        return 0.0
    m = _DURATION.match(text)
    if not text or not m or not any(m.groups()):
        raise ValueError(f"expected a duration like '90s', '30m', '1h30m' or '2d', got {value!r}")
    return float(sum(int(g) * unit for g, unit in zip(m.groups(), _DURATION_UNITS, strict=True) if g))


def format_duration(seconds: float) -> str:
    """Seconds -> the shortest Prometheus-style duration (for messages and docs)."""
    if seconds <= 0:
        return "0s"
    out = []
    rest = int(round(seconds))
    for unit, name in ((86400, "d"), (3600, "h"), (60, "m"), (1, "s")):
        if rest >= unit:
            out.append(f"{rest // unit}{name}")
            rest %= unit
    return "".join(out) or f"{seconds:g}s"


# ---- policy objects ---------------------------------------------------------------------


@dataclass(frozen=True)
class Matcher:
    """One label matcher. Regexes are anchored (fullmatch), as in Prometheus and
    Alertmanager; an absent label matches like the empty string."""

    label: str
    op: str  # "=", "!=", "=~", "!~"
    value: str
    regex: re.Pattern[str] | None = None

    def matches(self, labels: Mapping[str, str]) -> bool:
        got = str(labels.get(self.label, ""))
        if self.op == "=":
            return got == self.value
        if self.op == "!=":
            return got != self.value
        assert self.regex is not None
        hit = self.regex.fullmatch(got) is not None
        return hit if self.op == "=~" else not hit

    def __str__(self) -> str:
        return f'{self.label}{self.op}"{self.value}"'


@dataclass(frozen=True)
class ExecSpec:
    """A site command for ``action: exec``: argv (no shell); ``{node}`` in an argument
    is replaced by the node name (without one, the name is appended); stdin gets
    ``{"action": "exec", "node", "reason", "alert"}`` as JSON (remediation/actuators/exec.py)."""

    command: tuple[str, ...]
    timeout: float = 30.0


@dataclass(frozen=True)
class Rule:
    name: str
    index: int
    matchers: tuple[Matcher, ...]
    action: str
    reason: str = DEFAULT_REASON
    dry_run: bool = False
    requires_approval: bool = False
    auto_resume: bool = False
    resume_hold_down: float = 1800.0
    cooldown: float = 3600.0
    exec: ExecSpec | None = None

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(m.matches(labels) for m in self.matchers)

    def render_reason(self, alert: Mapping[str, Any]) -> str:
        """The scheduler reason for an alert: REASON_PREFIX + the rendered template,
        on one line, at most MAX_REASON_CHARS. Never raises."""
        return make_reason(render_template(self.reason, alert, rule=self.name, action=self.action))

    @property
    def label(self) -> str:
        return f"rules[{self.index}] ({self.name})"


@dataclass(frozen=True)
class Caps:
    max_unavailable_ratio: float = 0.1
    max_unavailable_nodes: int = 10
    partition_overrides: Mapping[str, float] = field(default_factory=dict)

    def ratio(self, partition: str) -> float:
        return self.partition_overrides.get(partition, self.max_unavailable_ratio)

    def partition_limit(self, partition: str, size: int) -> int:
        """How many nodes of a partition of ``size`` may be unavailable at once:
        floor(ratio x size), so 10 % of 9 nodes is 0 (use an override for small ones)."""
        return int(self.ratio(partition) * size + 1e-9)


@dataclass(frozen=True)
class RateLimit:
    actions_per_hour: float = 20.0
    burst: int = 5

    @property
    def per_second(self) -> float:
        return self.actions_per_hour / 3600.0


@dataclass(frozen=True)
class Breaker:
    failures_to_trip: int = 3
    cap_hits_to_trip: int = 1
    failure_window: float = 3600.0


@dataclass(frozen=True)
class Flap:
    max_drains: int = 3
    window: float = 86400.0


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...] = ()
    dry_run: bool = False
    caps: Caps = field(default_factory=Caps)
    rate_limit: RateLimit = field(default_factory=RateLimit)
    breaker: Breaker = field(default_factory=Breaker)
    flap: Flap = field(default_factory=Flap)
    resume_hold_down: float = 1800.0
    cooldown: float = 3600.0
    source: str = "<policy>"

    def match(self, labels: Mapping[str, str]) -> Rule | None:
        """The first rule whose matchers all hold, or None (recorded, not acted on)."""
        for rule in self.rules:
            if rule.matches(labels):
                return rule
        return None

    def rule(self, name: str) -> Rule | None:
        for rule in self.rules:
            if rule.name == name:
                return rule
        return None


# ---- reason templates -------------------------------------------------------------------


class _Blank(dict):
    """A mapping that answers "" for a missing key, so ``{labels[nope]}`` renders empty."""

    def __missing__(self, key: object) -> str:
        return ""


class _SafeFormatter(string.Formatter):
    def get_value(self, key: int | str, args: Any, kwargs: Mapping[str, Any]) -> Any:
        if isinstance(key, int):
            return ""
        return kwargs.get(key, "")

    def get_field(self, field_name: str, args: Any, kwargs: Mapping[str, Any]) -> Any:
        try:
            return super().get_field(field_name, args, kwargs)
        except Exception:
            return "", field_name

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        try:
            return super().convert_field(value, conversion)
        except Exception:
            return value

    def format_field(self, value: Any, format_spec: str) -> str:
        try:
            return super().format_field(value, format_spec)
        except Exception:
            return str(value)


_FORMATTER = _SafeFormatter()


def template_context(alert: Mapping[str, Any], *, rule: str = "", action: str = "") -> dict[str, Any]:
    labels = alert.get("labels") or {}
    annotations = alert.get("annotations") or {}
    labels = labels if isinstance(labels, Mapping) else {}
    annotations = annotations if isinstance(annotations, Mapping) else {}
    return {
        "alertname": str(labels.get("alertname", "")),
        "node": str(labels.get("node", "")),
        "status": str(alert.get("status", "")),
        "fingerprint": str(alert.get("fingerprint", "")),
        "startsAt": str(alert.get("startsAt", "")),
        "rule": rule,
        "action": action,
        "labels": _Blank({str(k): str(v) for k, v in labels.items()}),
        "annotations": _Blank({str(k): str(v) for k, v in annotations.items()}),
    }


def render_template(template: str, alert: Mapping[str, Any], *, rule: str = "", action: str = "") -> str:
    """str.format-style rendering that never raises: missing fields and keys render
    empty, a bad format spec renders the plain value, a broken template renders as is."""
    try:
        return _FORMATTER.vformat(template, (), template_context(alert, rule=rule, action=action))
    except Exception:
        return template


def make_reason(text: str) -> str:
    """One printable line, prefixed with REASON_PREFIX (ownership), bounded in length."""
    line = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    if line.startswith(REASON_PREFIX):
        line = line[len(REASON_PREFIX) :].lstrip()
    reason = f"{REASON_PREFIX} {line}" if line else REASON_PREFIX
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 3].rstrip() + "..."
    return reason


def check_template(template: str) -> str | None:
    """Why a reason template is invalid, or None. Checked at load so typos
    ("{nod}") fail the policy instead of rendering empty in every reason."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"invalid template: {exc}"
    for _literal, name, _spec, _conv in parsed:
        if name is None:
            continue
        root = re.split(r"[.\[]", name, maxsplit=1)[0]
        if root == "" or root.isdigit():
            return "positional fields ('{}', '{0}') are not allowed; use names such as {node}"
        if root not in TEMPLATE_FIELDS:
            return f"unknown field {{{name}}}; allowed: {', '.join(TEMPLATE_FIELDS)}"
        if "." in name:
            return f"attribute access in {{{name}}} is not allowed; use {root}[key]"
        if root in ("labels", "annotations") and not re.fullmatch(rf"{root}\[[A-Za-z_][A-Za-z0-9_]*\]", name):
            return f"use {root}[name] with one label name, got {{{name}}}"
        if root not in ("labels", "annotations") and name != root:
            return f"{{{root}}} is a string, got {{{name}}}"
    return None


# ---- loading and validation -------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML keeps the last silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

TOP_KEYS = ("dry_run", "caps", "rate_limit", "breaker", "flap", "resume_hold_down", "cooldown", "rules")
CAPS_KEYS = ("max_unavailable_ratio", "max_unavailable_nodes", "partition_overrides")
RATE_KEYS = ("actions_per_hour", "burst")
BREAKER_KEYS = ("failures_to_trip", "cap_hits_to_trip", "failure_window")
FLAP_KEYS = ("max_drains", "window")
RULE_KEYS = (
    "name", "match", "action", "reason", "dry_run", "requires_approval",
    "auto_resume", "resume_hold_down", "cooldown", "exec",
)  # fmt: skip
EXEC_KEYS = ("command", "timeout")


class _Ctx:
    """Builds error messages: '<file>: rules[2] (name): key 'cooldown': ...'."""

    def __init__(self, source: str, where: str = ""):
        self.source = source
        self.where = where

    def at(self, where: str) -> _Ctx:
        return _Ctx(self.source, where)

    def error(self, key: str | None, message: str) -> PolicyError:
        parts = [self.source]
        if self.where:
            parts.append(self.where)
        if key is not None:
            parts.append(f"key '{key}'")
        return PolicyError(": ".join(parts) + ": " + message)


def _mapping(ctx: _Ctx, key: str | None, value: Any, allowed: tuple[str, ...]) -> dict:
    if not isinstance(value, Mapping):
        raise ctx.error(key, f"expected a mapping, got {_kind(value)}")
    for k in value:
        if not isinstance(k, str):
            raise ctx.error(key, f"keys must be strings, got {k!r}")
        if k not in allowed:
            where = f"{key}.{k}" if key else k
            raise ctx.error(where, f"unknown key; allowed: {', '.join(allowed)}")
    return dict(value)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {value!r}"


def _bool(ctx: _Ctx, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ctx.error(key, f"expected true or false, got {_kind(value)}")
    return value


def _int(ctx: _Ctx, key: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ctx.error(key, f"expected a whole number, got {_kind(value)}")
    if value < minimum:
        raise ctx.error(key, f"must be at least {minimum}, got {value}")
    return value


def _ratio(ctx: _Ctx, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ctx.error(key, f"expected a number between 0 and 1, got {_kind(value)}")
    if not 0 <= value <= 1:
        raise ctx.error(key, f"must be between 0 and 1 (a share, 0.1 = 10 %), got {value}")
    return float(value)


def _positive(ctx: _Ctx, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ctx.error(key, f"expected a number, got {_kind(value)}")
    if value <= 0:
        raise ctx.error(key, f"must be greater than 0, got {value}")
    return float(value)


def _duration(ctx: _Ctx, key: str, value: Any, *, positive: bool = False) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise ctx.error(key, str(exc)) from None
    if positive and seconds <= 0:
        raise ctx.error(key, f"must be longer than 0, got {value!r}")
    return seconds


def _matchers(ctx: _Ctx, value: Any) -> tuple[Matcher, ...]:
    if not isinstance(value, Mapping):
        raise ctx.error("match", f"expected a mapping of label: value, got {_kind(value)}")
    out = []
    for label, raw in value.items():
        key = f"match.{label}"
        if not isinstance(label, str) or not _LABEL_NAME.match(label):
            raise ctx.error(key, "label names are letters, digits and underscores, not starting with a digit")
        if not isinstance(raw, str):
            raise ctx.error(key, f"expected a string (quote it in YAML), got {_kind(raw)}")
        op, text = "=", raw
        for prefix in ("=~", "!~", "!="):
            if raw.startswith(prefix):
                op, text = prefix, raw[len(prefix) :]
                break
        regex = None
        if op in ("=~", "!~"):
            try:
                regex = re.compile(text)
            except re.error as exc:
                raise ctx.error(key, f"invalid regex {text!r}: {exc}") from None
        elif _REGEX_HINT.search(text):
            raise ctx.error(
                key,
                f"{text!r} is compared literally but looks like a regex; write '=~{text}' for a regex match",
            )
        out.append(Matcher(label, op, text, regex))
    return tuple(out)


def _rule(ctx: _Ctx, index: int, raw: Any, policy_defaults: dict[str, float]) -> Rule:
    name = raw.get("name") if isinstance(raw, Mapping) else None
    rctx = ctx.at(f"rules[{index}]" + (f" ({name})" if isinstance(name, str) and name else ""))
    data = _mapping(rctx, None, raw, RULE_KEYS)
    for required in ("name", "match", "action"):
        if required not in data:
            raise rctx.error(required, "required key is missing")
    if not isinstance(name, str) or not name.strip():
        raise rctx.error("name", f"expected a non-empty string, got {_kind(name)}")
    action = data["action"]
    if action not in ACTIONS:
        raise rctx.error("action", f"expected one of {', '.join(ACTIONS)}, got {_kind(action)}")
    matchers = _matchers(rctx, data["match"])
    if not matchers and action in MUTATING_ACTIONS:
        raise rctx.error(
            "match",
            f"an empty match would {action} on every alert (how peers drained whole clusters); name at least one label",
        )
    reason = data.get("reason", DEFAULT_REASON)
    if not isinstance(reason, str):
        raise rctx.error("reason", f"expected a template string, got {_kind(reason)}")
    problem = check_template(reason)
    if problem:
        raise rctx.error("reason", problem)
    flags = {k: _bool(rctx, k, data[k]) for k in ("dry_run", "requires_approval", "auto_resume") if k in data}
    if flags.get("auto_resume") and action != "drain":
        why = "reboot returns the node itself (nextstate=RESUME)" if action == "reboot" else "nothing is drained"
        raise rctx.error("auto_resume", f"only a drain can be auto-resumed; action is {action} ({why})")
    if flags.get("requires_approval") and action == "notify":
        raise rctx.error("requires_approval", "notify changes nothing, so there is nothing to approve")
    hold_down = (
        _duration(rctx, "resume_hold_down", data["resume_hold_down"])
        if "resume_hold_down" in data
        else policy_defaults["resume_hold_down"]
    )
    if "resume_hold_down" in data and not flags.get("auto_resume"):
        raise rctx.error("resume_hold_down", "only meaningful with auto_resume: true")
    cooldown = _duration(rctx, "cooldown", data["cooldown"]) if "cooldown" in data else policy_defaults["cooldown"]
    exec_spec = None
    if action == "exec":
        if "exec" not in data:
            raise rctx.error("exec", "required for action exec: {command: [argv...], timeout: 30s}")
        spec = _mapping(rctx, "exec", data["exec"], EXEC_KEYS)
        command = spec.get("command")
        if (
            not isinstance(command, list)
            or not command
            or not all(isinstance(a, str) and a for a in command)
        ):
            raise rctx.error("exec.command", f"expected a non-empty list of strings (argv, no shell), got {_kind(command)}")
        timeout = _duration(rctx, "exec.timeout", spec["timeout"], positive=True) if "timeout" in spec else 30.0
        exec_spec = ExecSpec(tuple(command), timeout)
    elif "exec" in data:
        raise rctx.error("exec", f"only valid with action exec, action is {action}")
    return Rule(
        name=name,
        index=index,
        matchers=matchers,
        action=action,
        reason=reason,
        dry_run=flags.get("dry_run", False),
        requires_approval=flags.get("requires_approval", False),
        auto_resume=flags.get("auto_resume", False),
        resume_hold_down=hold_down,
        cooldown=cooldown,
        exec=exec_spec,
    )


def parse_policy(data: Any, source: str = "<policy>") -> Policy:
    """Validate a parsed YAML document into a Policy (raises PolicyError)."""
    ctx = _Ctx(source)
    if data is None:
        raise ctx.error(None, "the policy is empty; it needs at least 'rules'")
    top = _mapping(ctx, None, data, TOP_KEYS)
    if "rules" not in top:
        raise ctx.error("rules", "required key is missing (a list of rules; [] acts on nothing)")

    dry_run = _bool(ctx, "dry_run", top["dry_run"]) if "dry_run" in top else False

    caps = Caps()
    if "caps" in top:
        c = _mapping(ctx, "caps", top["caps"], CAPS_KEYS)
        overrides: dict[str, float] = {}
        if "partition_overrides" in c:
            raw = c["partition_overrides"]
            if not isinstance(raw, Mapping):
                raise ctx.error("caps.partition_overrides", f"expected a mapping of partition: ratio, got {_kind(raw)}")
            for part, ratio in raw.items():
                if not isinstance(part, str) or not part:
                    raise ctx.error("caps.partition_overrides", f"partition names are strings, got {part!r}")
                overrides[part] = _ratio(ctx, f"caps.partition_overrides.{part}", ratio)
        caps = Caps(
            max_unavailable_ratio=(
                _ratio(ctx, "caps.max_unavailable_ratio", c["max_unavailable_ratio"])
                if "max_unavailable_ratio" in c
                else Caps.max_unavailable_ratio
            ),
            max_unavailable_nodes=(
                _int(ctx, "caps.max_unavailable_nodes", c["max_unavailable_nodes"], minimum=0)
                if "max_unavailable_nodes" in c
                else Caps.max_unavailable_nodes
            ),
            partition_overrides=overrides,
        )

    rate = RateLimit()
    if "rate_limit" in top:
        r = _mapping(ctx, "rate_limit", top["rate_limit"], RATE_KEYS)
        rate = RateLimit(
            actions_per_hour=(
                _positive(ctx, "rate_limit.actions_per_hour", r["actions_per_hour"])
                if "actions_per_hour" in r
                else RateLimit.actions_per_hour
            ),
            burst=_int(ctx, "rate_limit.burst", r["burst"], minimum=1) if "burst" in r else RateLimit.burst,
        )

    breaker = Breaker()
    if "breaker" in top:
        b = _mapping(ctx, "breaker", top["breaker"], BREAKER_KEYS)
        breaker = Breaker(
            failures_to_trip=(
                _int(ctx, "breaker.failures_to_trip", b["failures_to_trip"], minimum=1)
                if "failures_to_trip" in b
                else Breaker.failures_to_trip
            ),
            cap_hits_to_trip=(
                _int(ctx, "breaker.cap_hits_to_trip", b["cap_hits_to_trip"], minimum=0)
                if "cap_hits_to_trip" in b
                else Breaker.cap_hits_to_trip
            ),
            failure_window=(
                _duration(ctx, "breaker.failure_window", b["failure_window"], positive=True)
                if "failure_window" in b
                else Breaker.failure_window
            ),
        )

    flap = Flap()
    if "flap" in top:
        f = _mapping(ctx, "flap", top["flap"], FLAP_KEYS)
        flap = Flap(
            max_drains=_int(ctx, "flap.max_drains", f["max_drains"], minimum=1) if "max_drains" in f else Flap.max_drains,
            window=_duration(ctx, "flap.window", f["window"], positive=True) if "window" in f else Flap.window,
        )

    defaults = {
        "resume_hold_down": (
            _duration(ctx, "resume_hold_down", top["resume_hold_down"])
            if "resume_hold_down" in top
            else Policy.resume_hold_down
        ),
        "cooldown": _duration(ctx, "cooldown", top["cooldown"]) if "cooldown" in top else Policy.cooldown,
    }

    raw_rules = top["rules"]
    if not isinstance(raw_rules, list):
        raise ctx.error("rules", f"expected a list of rules, got {_kind(raw_rules)}")
    rules = []
    names: dict[str, int] = {}
    for i, raw in enumerate(raw_rules):
        rule = _rule(ctx, i, raw, defaults)
        if rule.name in names:
            raise ctx.at(rule.label).error("name", f"duplicate rule name; rules[{names[rule.name]}] has it too")
        names[rule.name] = i
        rules.append(rule)

    return Policy(
        rules=tuple(rules),
        dry_run=dry_run,
        caps=caps,
        rate_limit=rate,
        breaker=breaker,
        flap=flap,
        resume_hold_down=defaults["resume_hold_down"],
        cooldown=defaults["cooldown"],
        source=source,
    )


def parse_policy_text(text: str, source: str = "<policy>") -> Policy:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from None
    return parse_policy(data, source)


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file (raises PolicyError naming the file)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy: {exc.strerror or exc}") from None
    return parse_policy_text(text, str(path))
