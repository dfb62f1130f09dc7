"""The kopf operator: handlers for the three kinds, and how to run them."""

from __future__ import annotations

import logging
import os


def run_operator(
    *,
    namespaces: list[str],
    peering: str | None,
    liveness: str | None,
    kubeconfig: str | None,
    verbose: bool = False,
    log_format: str = "plain",
) -> None:
    """Run until stopped: one namespace, several, or (none given) the whole cluster.

    With a peering name, only one operator replica acts at a time (kopf peering); without, the
    operator runs standalone.
    """
    # Imported here, not at the top: every other CLI command starts without kopf and the
    # handlers (which load Prefect), and the handlers register themselves when imported.
    import kopf

    from lume_operator.handlers import operator  # noqa: F401  (registers the handlers)
    from lume_operator.handlers.kube import load_config

    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig
    load_config(kubeconfig)
    formats = {
        "plain": kopf.LogFormat.PLAIN,
        "full": kopf.LogFormat.FULL,
        "json": kopf.LogFormat.JSON,
    }
    kopf.configure(verbose=verbose, log_format=formats[log_format])
    logging.getLogger("httpx").setLevel(logging.WARNING)
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        peering_name=peering,
        standalone=peering is None,
        liveness_endpoint=liveness,
    )
