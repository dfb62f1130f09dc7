"""lume-operator: Prefect 3 workflows as Kubernetes objects."""

GROUP = "lume.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

__version__ = "0.1.0"
