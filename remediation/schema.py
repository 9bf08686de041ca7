"""Request models of the remediation service (pydantic v2), validated before the engine sees anything.

``WebhookPayload`` is Alertmanager's webhook payload, version 4 (the ``Message`` of
Alertmanager's ``notify/webhook`` package: ``template.Data`` plus ``version``,
``groupKey`` and ``truncatedAlerts``). Validation is strict (no coercion: ``"3"`` is
not an integer and ``3`` is not a string), unknown fields are ignored (newer
Alertmanagers may add some), and what the engine receives is the model dumped with
Alertmanager's own field names, so nothing it did not validate reaches a decision.

Required: ``version`` (``"4"``), ``status``, ``receiver``, ``alerts``; in every alert
``status``, ``labels`` and ``startsAt``. The rest defaults to empty, so a sender
other than Alertmanager (a test, a script) may leave it out. ``receiver`` is taken as
it comes: Alertmanager sends it passed through Go's ``regexp.QuoteMeta``
(``gpufleet\\.remediation`` for a receiver named ``gpufleet.remediation``), so it is
recorded, never matched against anything.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

__all__ = ["WHO_HEADER", "AdminRequest", "WebhookAlert", "WebhookPayload", "check_who"]

#: Header that names the human behind an admin call when the body does not.
WHO_HEADER = "X-Gpufleet-Who"

# RFC 3339 as Alertmanager writes it (Go's time.Time JSON: up to nanoseconds, Z or an offset).
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _timestamp(value: str) -> str:
    if not _RFC3339.match(value):
        raise ValueError("expected an RFC 3339 timestamp such as 2024-05-01T12:00:00.123Z")
    return value


def _optional_timestamp(value: str) -> str:
    return value if value == "" else _timestamp(value)


Timestamp = Annotated[str, AfterValidator(_timestamp)]
OptionalTimestamp = Annotated[str, AfterValidator(_optional_timestamp)]
Labels = dict[str, str]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True, frozen=True)


class WebhookAlert(_Model):
    status: Literal["firing", "resolved"]
    labels: Labels
    annotations: Labels = Field(default_factory=dict)
    starts_at: Timestamp = Field(alias="startsAt")
    # Alertmanager sends 0001-01-01T00:00:00Z for "not ended".
    ends_at: OptionalTimestamp = Field(default="", alias="endsAt")
    generator_url: str = Field(default="", alias="generatorURL")
    fingerprint: str = Field(default="", max_length=128)


class WebhookPayload(_Model):
    version: Literal["4"]
    group_key: str = Field(default="", alias="groupKey")
    truncated_alerts: int = Field(default=0, ge=0, alias="truncatedAlerts")
    status: Literal["firing", "resolved"]
    receiver: str
    group_labels: Labels = Field(default_factory=dict, alias="groupLabels")
    common_labels: Labels = Field(default_factory=dict, alias="commonLabels")
    common_annotations: Labels = Field(default_factory=dict, alias="commonAnnotations")
    external_url: str = Field(default="", alias="externalURL")
    alerts: list[WebhookAlert]

    def for_engine(self) -> dict:
        """The payload with Alertmanager's field names, as ``Engine.handle`` takes it."""
        return self.model_dump(by_alias=True)


def check_who(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    if _CONTROL.search(value):
        raise ValueError("must be one line of printable text")
    return value


Who = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(check_who)]


class AdminRequest(_Model):
    """Body of an admin POST (optional when the ``X-Gpufleet-Who`` header names the caller)."""

    who: Who | None = None
