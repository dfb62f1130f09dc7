"""Containers for the tests: a Docker Engine of their own, and the images they run."""
