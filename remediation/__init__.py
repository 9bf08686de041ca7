"""gpufleet-remediation: Alertmanager webhooks that drain bad nodes under guardrails.

- policy.py: the policy file (rules, caps, rate limit, breaker, flap), validated at load
- store.py: SQLite (WAL) state and audit: deliveries, decisions, actions, approvals
- engine.py: idempotent decisions through the guardrails, intent before acting,
  reconciliation after a crash, auto-resume of nodes it drained itself
- actuators/: Slurm (scontrol, slurmrestd), Kubernetes, exec; base.py is the contract
- memory.py: an in-memory actuator for property tests and the benchmark
- schema.py, service.py: the HTTP service (FastAPI): the Alertmanager webhook, health,
  metrics and the admin API, with bearer tokens from files
- cli.py: the umbrella ``gpufleet`` command (``gpufleet remediation status|history|...``)
"""
