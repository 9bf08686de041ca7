"""The remediation policy: the shipped file, every validation error, matching, reason templates.

A policy mistake must fail at start with a message that names the file, the rule and
the key, never at 3 a.m. as a drain of the wrong nodes.
"""

from __future__ import annotations

import textwrap

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from remediation.actuators.base import REASON_PREFIX
from remediation.policy import (
    MAX_REASON_CHARS,
    Caps,
    PolicyError,
    load_policy,
    make_reason,
    parse_duration,
    parse_policy,
    parse_policy_text,
    render_template,
)
from tests.conftest import REPO

SHIPPED = REPO / "alerts" / "remediation-policy.yml"


def remediable_alerts() -> list[dict]:
    """Every alerting rule in alerts/rules that carries a remediation label."""
    out = []
    for path in sorted((REPO / "alerts" / "rules").glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule and "remediation" in rule.get("labels", {}):
                    out.append({"alertname": rule["alert"], **rule["labels"]})
    return out


# ---- the shipped policy ------------------------------------------------------------------


def test_shipped_policy_loads_and_is_live():
    policy = load_policy(SHIPPED)
    assert policy.dry_run is False
    assert policy.caps.max_unavailable_ratio == 0.1
    assert policy.caps.max_unavailable_nodes >= 1
    assert policy.breaker.cap_hits_to_trip >= 1


def test_shipped_policy_reboots_reboot_alerts_without_auto_resume():
    rule = load_policy(SHIPPED).match({"alertname": "GpuLost", "remediation": "reboot", "node": "n1"})
    assert rule is not None and rule.action == "reboot"
    assert rule.auto_resume is False  # scontrol reboot ... nextstate=RESUME returns the node itself


def test_shipped_policy_drains_hardware_alerts_for_a_human():
    rule = load_policy(SHIPPED).match({"alertname": "GpuXidHardwareInspection", "remediation": "drain", "node": "n1"})
    assert rule is not None and rule.action == "drain"
    assert rule.requires_approval is False
    assert rule.auto_resume is False


@pytest.mark.parametrize("labels", remediable_alerts(), ids=lambda lab: f"{lab['alertname']}-{lab['remediation']}")
def test_every_remediable_alert_rule_maps_to_its_action(labels):
    rule = load_policy(SHIPPED).match({**labels, "node": "gpu-node-1"})
    assert rule is not None, f"{labels['alertname']} carries remediation={labels['remediation']} but no rule matches"
    assert rule.action == labels["remediation"]


def test_alerts_without_remediation_label_match_no_shipped_rule():
    policy = load_policy(SHIPPED)
    assert policy.match({"alertname": "GpuTemperatureHigh", "severity": "critical", "node": "n1"}) is None


def test_shipped_reasons_render_for_every_remediable_alert():
    policy = load_policy(SHIPPED)
    for labels in remediable_alerts():
        rule = policy.match({**labels, "node": "gpu-node-1"})
        reason = rule.render_reason({"labels": {**labels, "node": "gpu-node-1"}, "annotations": {"summary": "S."}})
        assert reason.startswith(REASON_PREFIX)
        assert "gpu-node-1" in reason and labels["alertname"] in reason


# ---- validation: every error names the file, the rule and the key --------------------------

GOOD_RULE = {"name": "r", "match": {"remediation": "drain"}, "action": "drain"}


def rule(**over) -> dict:
    out = dict(GOOD_RULE)
    for key, value in over.items():
        if value is ...:
            out.pop(key, None)
        else:
            out[key] = value
    return out


ERRORS = [
    # (id, document, expected fragment of the message)
    ("top-unknown-key", {"rules": [], "dryrun": True}, "key 'dryrun': unknown key; allowed: dry_run"),
    ("rules-missing", {"dry_run": True}, "key 'rules': required key is missing"),
    ("rules-not-list", {"rules": {"a": 1}}, "key 'rules': expected a list of rules"),
    ("dry-run-not-bool", {"dry_run": "yes", "rules": []}, "key 'dry_run': expected true or false, got str 'yes'"),
    ("caps-not-mapping", {"caps": 0.1, "rules": []}, "key 'caps': expected a mapping"),
    ("caps-unknown", {"caps": {"max_ratio": 0.1}, "rules": []}, "key 'caps.max_ratio': unknown key"),
    ("caps-ratio-range", {"caps": {"max_unavailable_ratio": 2}, "rules": []},
     "key 'caps.max_unavailable_ratio': must be between 0 and 1"),
    ("caps-ratio-type", {"caps": {"max_unavailable_ratio": "10%"}, "rules": []},
     "key 'caps.max_unavailable_ratio': expected a number between 0 and 1, got str '10%'"),
    ("caps-nodes-negative", {"caps": {"max_unavailable_nodes": -1}, "rules": []},
     "key 'caps.max_unavailable_nodes': must be at least 0"),
    ("caps-nodes-bool", {"caps": {"max_unavailable_nodes": True}, "rules": []},
     "key 'caps.max_unavailable_nodes': expected a whole number, got bool"),
    ("caps-nodes-float", {"caps": {"max_unavailable_nodes": 2.5}, "rules": []},
     "key 'caps.max_unavailable_nodes': expected a whole number"),
    ("caps-override-ratio", {"caps": {"partition_overrides": {"debug": 1.5}}, "rules": []},
     "key 'caps.partition_overrides.debug': must be between 0 and 1"),
    ("caps-override-type", {"caps": {"partition_overrides": ["debug"]}, "rules": []},
     "key 'caps.partition_overrides': expected a mapping of partition: ratio"),
    ("rate-zero", {"rate_limit": {"actions_per_hour": 0}, "rules": []},
     "key 'rate_limit.actions_per_hour': must be greater than 0"),
    ("rate-burst-zero", {"rate_limit": {"burst": 0}, "rules": []}, "key 'rate_limit.burst': must be at least 1"),
    ("rate-unknown", {"rate_limit": {"per_hour": 3}, "rules": []}, "key 'rate_limit.per_hour': unknown key"),
    ("breaker-failures-zero", {"breaker": {"failures_to_trip": 0}, "rules": []},
     "key 'breaker.failures_to_trip': must be at least 1"),
    ("breaker-window-zero", {"breaker": {"failure_window": "0s"}, "rules": []},
     "key 'breaker.failure_window': must be longer than 0"),
    ("breaker-window-number", {"breaker": {"failure_window": 3600}, "rules": []},
     "key 'breaker.failure_window': expected a duration string like '30m', got 3600"),
    ("flap-type", {"flap": {"max_drains": "3"}, "rules": []}, "key 'flap.max_drains': expected a whole number"),
    ("flap-window", {"flap": {"window": "a day"}, "rules": []}, "key 'flap.window': expected a duration like"),
    ("hold-down-top", {"resume_hold_down": "soon", "rules": []}, "key 'resume_hold_down': expected a duration"),
    ("cooldown-top", {"cooldown": 60, "rules": []}, "key 'cooldown': expected a duration string"),
    ("rule-not-mapping", {"rules": ["drain everything"]}, "rules[0]: expected a mapping, got str"),
    ("rule-unknown-key", {"rules": [rule(auto_resum=True)]}, "rules[0] (r): key 'auto_resum': unknown key"),
    ("rule-missing-name", {"rules": [rule(name=...)]}, "rules[0]: key 'name': required key is missing"),
    ("rule-empty-name", {"rules": [rule(name="")]}, "rules[0]: key 'name': expected a non-empty string"),
    ("rule-missing-match", {"rules": [rule(match=...)]}, "rules[0] (r): key 'match': required key is missing"),
    ("rule-missing-action", {"rules": [rule(action=...)]}, "rules[0] (r): key 'action': required key is missing"),
    ("rule-bad-action", {"rules": [rule(action="cordon")]},
     "rules[0] (r): key 'action': expected one of drain, reboot, notify, exec, got str 'cordon'"),
    ("match-not-mapping", {"rules": [rule(match=["remediation=drain"])]},
     "rules[0] (r): key 'match': expected a mapping of label: value"),
    ("match-value-int", {"rules": [rule(match={"gpu": 0})]},
     "rules[0] (r): key 'match.gpu': expected a string (quote it in YAML), got int 0"),
    ("match-label-name", {"rules": [rule(match={"bad-label": "x"})]}, "rules[0] (r): key 'match.bad-label': label names"),
    ("match-bad-regex", {"rules": [rule(match={"alertname": "=~Gpu(Xid"})]},
     "rules[0] (r): key 'match.alertname': invalid regex 'Gpu(Xid'"),
    ("match-literal-looks-regex", {"rules": [rule(match={"alertname": "GpuXid.*"})]},
     "rules[0] (r): key 'match.alertname': 'GpuXid.*' is compared literally but looks like a regex; write '=~GpuXid.*'"),
    ("match-empty-drain", {"rules": [rule(match={})]}, "rules[0] (r): key 'match': an empty match would drain on every alert"),
    ("reason-type", {"rules": [rule(reason=["x"])]}, "rules[0] (r): key 'reason': expected a template string"),
    ("reason-unknown-field", {"rules": [rule(reason="{alertname} on {nod}")]},
     "rules[0] (r): key 'reason': unknown field {nod}"),
    ("reason-positional", {"rules": [rule(reason="{} broke")]}, "rules[0] (r): key 'reason': positional fields"),
    ("reason-unbalanced", {"rules": [rule(reason="{node")]}, "rules[0] (r): key 'reason': invalid template"),
    ("reason-attribute", {"rules": [rule(reason="{labels.gpu}")]}, "rules[0] (r): key 'reason': attribute access"),
    ("reason-index-string", {"rules": [rule(reason="{node[0]}")]}, "rules[0] (r): key 'reason': {node} is a string"),
    ("dry-run-rule-type", {"rules": [rule(dry_run="no")]}, "rules[0] (r): key 'dry_run': expected true or false"),
    ("approval-type", {"rules": [rule(requires_approval=1)]}, "rules[0] (r): key 'requires_approval': expected true or false"),
    ("auto-resume-reboot", {"rules": [rule(action="reboot", auto_resume=True)]},
     "rules[0] (r): key 'auto_resume': only a drain can be auto-resumed; action is reboot"),
    ("approval-notify", {"rules": [rule(action="notify", requires_approval=True)]},
     "rules[0] (r): key 'requires_approval': notify changes nothing"),
    ("hold-down-without-auto-resume", {"rules": [rule(resume_hold_down="10m")]},
     "rules[0] (r): key 'resume_hold_down': only meaningful with auto_resume: true"),
    ("hold-down-bad", {"rules": [rule(auto_resume=True, resume_hold_down="10 minutes")]},
     "rules[0] (r): key 'resume_hold_down': expected a duration like"),
    ("cooldown-bad", {"rules": [rule(cooldown="1 hour")]}, "rules[0] (r): key 'cooldown': expected a duration like"),
    ("exec-missing", {"rules": [rule(action="exec")]}, "rules[0] (r): key 'exec': required for action exec"),
    ("exec-on-drain", {"rules": [rule(exec={"command": ["true"]})]}, "rules[0] (r): key 'exec': only valid with action exec"),
    ("exec-command-string", {"rules": [rule(action="exec", exec={"command": "fix.sh {node}"})]},
     "rules[0] (r): key 'exec.command': expected a non-empty list of strings"),
    ("exec-command-empty", {"rules": [rule(action="exec", exec={"command": []})]},
     "rules[0] (r): key 'exec.command': expected a non-empty list"),
    ("exec-timeout", {"rules": [rule(action="exec", exec={"command": ["x"], "timeout": 30})]},
     "rules[0] (r): key 'exec.timeout': expected a duration string"),
    ("exec-unknown", {"rules": [rule(action="exec", exec={"command": ["x"], "shell": True})]},
     "rules[0] (r): key 'exec.shell': unknown key"),
    ("duplicate-names", {"rules": [rule(), rule(match={"remediation": "reboot"}, action="reboot")]},
     "rules[1] (r): key 'name': duplicate rule name; rules[0] has it too"),
    ("second-rule-index", {"rules": [rule(), rule(name="two", cooldown="x")]}, "rules[1] (two): key 'cooldown'"),
]  # fmt: skip


@pytest.mark.parametrize(("doc", "fragment"), [(d, f) for _, d, f in ERRORS], ids=[i for i, _, _ in ERRORS])
def test_invalid_policy_is_rejected_with_a_precise_message(tmp_path, doc, fragment):
    path = tmp_path / "policy.yml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    message = str(err.value)
    assert message.startswith(f"{path}: "), message
    assert fragment in message, message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("rules: [\n  {name: a,\n", "not valid YAML"),
        ("rules: []\nrules: []\n", "duplicate key 'rules'"),
        ("", "the policy is empty"),
        ("- a\n- b\n", "expected a mapping, got list"),
        ("rules:\n  - name: a\n    match: {node: n1}\n    match: {node: n2}\n    action: drain\n", "duplicate key 'match'"),
    ],
    ids=["broken-yaml", "duplicate-top-key", "empty", "list-document", "duplicate-rule-key"],
)
def test_unparseable_policy_text_is_rejected(tmp_path, text, fragment):
    path = tmp_path / "p.yml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=fragment) as err:
        load_policy(path)
    assert str(err.value).startswith(str(path))


def test_missing_policy_file_is_named(tmp_path):
    with pytest.raises(PolicyError, match=r"nope\.yml: cannot read the policy"):
        load_policy(tmp_path / "nope.yml")


def test_defaults_apply_when_sections_are_absent():
    policy = parse_policy({"rules": [GOOD_RULE]})
    assert policy.caps == Caps()
    assert policy.dry_run is False
    r = policy.rules[0]
    assert (r.cooldown, r.resume_hold_down, r.requires_approval, r.auto_resume, r.dry_run) == (
        policy.cooldown, policy.resume_hold_down, False, False, False,
    )  # fmt: skip


def test_top_level_defaults_flow_into_rules():
    policy = parse_policy({"cooldown": "5m", "resume_hold_down": "2m", "rules": [rule(auto_resume=True)]})
    assert policy.rules[0].cooldown == 300 and policy.rules[0].resume_hold_down == 120


def test_full_policy_parses_every_knob():
    policy = parse_policy_text(
        textwrap.dedent(
            """
            dry_run: true
            caps: {max_unavailable_ratio: 0.05, max_unavailable_nodes: 3, partition_overrides: {debug: 0.5}}
            rate_limit: {actions_per_hour: 6, burst: 2}
            breaker: {failures_to_trip: 2, cap_hits_to_trip: 0, failure_window: 30m}
            flap: {max_drains: 4, window: 12h}
            resume_hold_down: 15m
            cooldown: 45m
            rules:
              - name: x
                match: {alertname: "=~GpuXid.*", severity: critical, node: "!=login1", gpu: "!~9"}
                action: exec
                reason: "{alertname} {labels[xid]} {annotations[summary]}"
                dry_run: false
                requires_approval: true
                cooldown: 1h30m
                exec: {command: [/usr/local/sbin/gpu-reset, "{node}"], timeout: 2m}
              - name: y
                match: {remediation: drain}
                action: drain
                auto_resume: true
                resume_hold_down: 1h
            """
        ),
        "inline.yml",
    )
    assert policy.dry_run and policy.caps.partition_limit("debug", 4) == 2
    assert policy.caps.partition_limit("gpu", 100) == 5
    assert policy.rate_limit.burst == 2 and policy.rate_limit.per_second == pytest.approx(6 / 3600)
    assert (policy.breaker.failures_to_trip, policy.breaker.cap_hits_to_trip, policy.breaker.failure_window) == (2, 0, 1800)
    assert (policy.flap.max_drains, policy.flap.window) == (4, 43200)
    x, y = policy.rules
    assert x.exec.command == ("/usr/local/sbin/gpu-reset", "{node}") and x.exec.timeout == 120
    assert x.cooldown == 5400 and x.requires_approval
    assert y.auto_resume and y.resume_hold_down == 3600 and y.cooldown == 2700


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0), ("0s", 0), ("90s", 90), ("30m", 1800), ("1h30m", 5400), ("2d", 172800), ("1w", 604800),
     ("500ms", 0.5), ("1h0m5s", 3605)],
)  # fmt: skip
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "5", "5 m", "m", "1.5h", "30min", "-5m", "1m1h", 300, None, True])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_small_partitions_get_no_drains_from_a_ratio_alone():
    caps = Caps(max_unavailable_ratio=0.1, partition_overrides={"tiny": 0.34})
    assert caps.partition_limit("big", 9) == 0
    assert caps.partition_limit("big", 10) == 1
    assert caps.partition_limit("tiny", 3) == 1


# ---- matching ---------------------------------------------------------------------------------


def policy_of(*rules: dict) -> object:
    return parse_policy({"rules": list(rules)})


def test_equality_match():
    p = policy_of(rule())
    assert p.match({"remediation": "drain"}).name == "r"
    assert p.match({"remediation": "reboot"}) is None
    assert p.match({}) is None


def test_regex_match_is_anchored():
    p = policy_of(rule(match={"alertname": "=~GpuXid.*", "severity": "critical"}))
    assert p.match({"alertname": "GpuXidRebootRequired", "severity": "critical"})
    assert p.match({"alertname": "MyGpuXid", "severity": "critical"}) is None  # fullmatch, like Prometheus
    assert p.match({"alertname": "GpuXidRebootRequired", "severity": "warning"}) is None


def test_negative_matchers_and_absent_labels():
    p = policy_of(rule(match={"remediation": "drain", "node": "!=login1", "partition": "!~debug|test"}))
    assert p.match({"remediation": "drain", "node": "n1"})  # absent partition is "" which !~ debug|test
    assert p.match({"remediation": "drain", "node": "login1"}) is None
    assert p.match({"remediation": "drain", "node": "n1", "partition": "debug"}) is None
    empty = policy_of(rule(match={"remediation": "drain", "team": "=~"}))
    assert empty.match({"remediation": "drain"})  # an absent label matches the empty regex
    assert empty.match({"remediation": "drain", "team": "ml"}) is None


def test_first_matching_rule_wins():
    p = policy_of(
        rule(name="specific", match={"remediation": "drain", "alertname": "GpuRowRemapFailed"}, action="notify"),
        rule(name="general"),
    )
    assert p.match({"remediation": "drain", "alertname": "GpuRowRemapFailed"}).name == "specific"
    assert p.match({"remediation": "drain", "alertname": "GpuFewerThanExpected"}).name == "general"


def test_notify_rule_may_match_everything():
    p = policy_of(rule(name="all", match={}, action="notify"))
    assert p.match({"anything": "x"}).name == "all"


# ---- reason templates -------------------------------------------------------------------------

ALERT = {
    "status": "firing",
    "labels": {"alertname": "GpuLost", "node": "gpu-node-3", "gpu": "5"},
    "annotations": {"summary": "A GPU is lost or needs a reset."},
    "fingerprint": "abc",
    "startsAt": "2024-05-01T10:00:00Z",
}


def test_reason_template_renders_fields_labels_and_annotations():
    r = policy_of(rule(reason="{alertname} on {node} GPU {labels[gpu]}: {annotations[summary]} ({rule}/{action})"))
    assert r.rules[0].render_reason(ALERT) == (
        "gpufleet: GpuLost on gpu-node-3 GPU 5: A GPU is lost or needs a reset. (r/drain)"
    )


def test_reason_template_missing_keys_render_empty():
    assert render_template("{labels[nope]}|{annotations[nope]}|{node}", {"labels": {}}) == "||"
    assert render_template("{node}", {}) == ""
    assert render_template("{node}", {"labels": None, "annotations": "junk"}) == ""


def test_reason_template_bad_format_spec_never_raises():
    assert render_template("{node:d} {alertname!z}", ALERT) == "gpu-node-3 GpuLost"
    assert render_template("{", ALERT) == "{"
    assert render_template("{0} {x.y}", ALERT) == " "


def test_reason_is_one_bounded_line_with_one_prefix():
    assert make_reason("a\nb\tc\x00d") == "gpufleet: a b c d"
    assert make_reason("gpufleet: already prefixed") == "gpufleet: already prefixed"
    assert make_reason("") == "gpufleet:"
    long = make_reason("x" * 1000)
    assert len(long) == MAX_REASON_CHARS and long.endswith("...") and long.startswith(REASON_PREFIX)


@settings(max_examples=200, deadline=None)
@given(
    template=st.text(max_size=40),
    labels=st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=4),
    annotations=st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=3),
)
def test_rendering_never_raises_and_always_yields_a_prefixed_reason(template, labels, annotations):
    reason = make_reason(render_template(template, {"labels": labels, "annotations": annotations}))
    assert reason.startswith(REASON_PREFIX)
    assert "\n" not in reason and len(reason) <= MAX_REASON_CHARS
