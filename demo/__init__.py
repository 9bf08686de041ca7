"""gpufleet's demo: the whole loop (Slurm, node agents, Prometheus, Alertmanager, the
remediation service) on one machine, with a scripted fault scenario (``gpufleet demo``)."""
