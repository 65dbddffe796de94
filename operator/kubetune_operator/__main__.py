"""Entry point: ``python -m kubetune_operator`` runs the kopf operator in this process."""

from __future__ import annotations

import logging

import kopf
from kubernetes import client, config

from kubetune_operator import api, manifests
from kubetune_operator.handlers import register
from kubetune_operator.kube import Kube
from kubetune_operator.metrics import Health, MetricsServer, OperatorMetrics
from kubetune_operator.notifications import Notifier
from kubetune_operator.persistence import HandledState, MemoryDiffBaseStorage, MemoryProgressStorage
from kubetune_operator.reconciler import Reconciler
from kubetune_operator.runtime import Runtime
from kubetune_operator.settings import OperatorSettings

ANNOTATION_PREFIX = "kubetune.io"


def kube_client(settings: OperatorSettings) -> client.ApiClient:
    """An API client from the pod's service account, or from the kubeconfig outside a cluster."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    # One pooled connection per handler thread, so handlers do not queue for connections.
    configuration.connection_pool_maxsize = settings.max_workers
    return client.ApiClient(configuration)


def kopf_settings(settings: OperatorSettings, handled: HandledState) -> kopf.OperatorSettings:
    """kopf configured to keep its per-object state in memory (no PATCH of each new FinetuneJob)."""
    kopf_config = kopf.OperatorSettings()
    kopf_config.persistence.progress_storage = MemoryProgressStorage(handled, prefix=ANNOTATION_PREFIX)
    kopf_config.persistence.diffbase_storage = MemoryDiffBaseStorage(handled, prefix=ANNOTATION_PREFIX, kind=api.KIND)
    kopf_config.posting.reporting_component = "kubetune-operator"
    kopf_config.posting.level = logging.WARNING
    kopf_config.execution.max_workers = settings.max_workers
    # Only the operator's own children are streamed from the apiserver, not every pod and Job.
    selector = f"{manifests.LABEL_MANAGED_BY}={manifests.MANAGED_BY}"
    kopf_config.watching.label_selectors["v1", "pods"] = selector
    kopf_config.watching.label_selectors["batch", "v1", "jobs"] = selector
    if settings.peering:
        kopf_config.peering.mandatory = True
    return kopf_config


def main() -> None:
    settings = OperatorSettings()
    kopf.configure(verbose=False, log_format=kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.PLAIN)
    metrics = OperatorMetrics()
    health = Health()
    registry = kopf.OperatorRegistry()
    kube = Kube(kube_client(settings), metrics)
    notifier = Notifier(settings.notification_sinks, metrics.registry, signing_key=settings.notification_signing_key, secret_value=kube.secret_value)
    notifier.start()
    runtime = Runtime(settings=settings, metrics=metrics, health=health, notifier=notifier)
    register(registry, Reconciler(runtime, kube))
    server = MetricsServer(settings.operator_host, settings.operator_port, metrics, health)
    server.start()
    try:
        kopf.run(
            registry=registry,
            settings=kopf_settings(settings, runtime.handled),
            standalone=not settings.peering,
            peering_name=settings.peering or None,
            clusterwide=settings.clusterwide,
            namespaces=settings.watch_namespaces,
            ready_flag=health.ready,
        )
    finally:
        notifier.stop()
        server.stop()


if __name__ == "__main__":
    main()
