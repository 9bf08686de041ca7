"""Actuators: the only code that changes a scheduler. See base.py for the contract."""
