"""gpufleet-remediation: Alertmanager webhooks that drain bad nodes under guardrails.

Lands with issue "The remediation service" (see DESIGN.md); nothing here yet.
"""
