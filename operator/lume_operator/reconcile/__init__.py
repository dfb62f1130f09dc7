"""Spec and observed state in, actions and status out: shared by the operator and the local runner."""
