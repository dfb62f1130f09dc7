"""The local adapter: manifests from files, an embedded Prefect server, status printed."""
