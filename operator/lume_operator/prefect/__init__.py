"""The only layer that talks to the Prefect API."""
