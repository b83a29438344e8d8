"""Every Kubernetes API permission the operator needs, in one list: the chart's RBAC is tested against it.

(apiGroup, resource, verb) for each call that reconcile.py and kopf make. Keep it exactly in sync:
a missing entry breaks the operator in a real cluster, an extra one widens its privileges for nothing.
"""

from __future__ import annotations

from typing import Final

from . import constants

REQUIRED_PERMISSIONS: Final[list[tuple[str, str, str]]] = [
    # DistilledModels: kopf lists and watches them; reconcile.py reads one when its InferenceService
    # changes. Only a DistillationJob's deploy patches one (below); kopf keeps its bookkeeping in status.
    (constants.GROUP, constants.PLURAL, "get"),
    (constants.GROUP, constants.PLURAL, "list"),
    (constants.GROUP, constants.PLURAL, "watch"),
    # Our status (conditions, phase, url, ...) and kopf's bookkeeping, through the status subresource.
    (constants.GROUP, f"{constants.PLURAL}/status", "patch"),
    # ownerReferences with blockOwnerDeletion need update on the owner's finalizers subresource
    # (the OwnerReferencesPermissionEnforcement admission plugin).
    (constants.GROUP, f"{constants.PLURAL}/finalizers", "update"),
    # The child InferenceServices: watched, read, created and patched (drift repair); never deleted
    # (the garbage collector does that through the ownerReference).
    (constants.KSERVE_GROUP, constants.ISVC_PLURAL, "get"),
    (constants.KSERVE_GROUP, constants.ISVC_PLURAL, "list"),
    (constants.KSERVE_GROUP, constants.ISVC_PLURAL, "watch"),
    (constants.KSERVE_GROUP, constants.ISVC_PLURAL, "create"),
    (constants.KSERVE_GROUP, constants.ISVC_PLURAL, "patch"),
    # DistillationJobs, like DistilledModels: watched, status written, owners of their TrainJob.
    (constants.GROUP, constants.DJ_PLURAL, "get"),
    (constants.GROUP, constants.DJ_PLURAL, "list"),
    (constants.GROUP, constants.DJ_PLURAL, "watch"),
    (constants.GROUP, f"{constants.DJ_PLURAL}/status", "patch"),
    (constants.GROUP, f"{constants.DJ_PLURAL}/finalizers", "update"),
    # spec.deploy: the DistillationJob creates or patches its DistilledModel to serve the artifact.
    (constants.GROUP, constants.PLURAL, "create"),
    (constants.GROUP, constants.PLURAL, "patch"),
    # The child TrainJobs: watched, read, created, labels restored; deleted by the garbage collector.
    (constants.TRAINER_GROUP, constants.TRAINJOB_PLURAL, "get"),
    (constants.TRAINER_GROUP, constants.TRAINJOB_PLURAL, "list"),
    (constants.TRAINER_GROUP, constants.TRAINJOB_PLURAL, "watch"),
    (constants.TRAINER_GROUP, constants.TRAINJOB_PLURAL, "create"),
    (constants.TRAINER_GROUP, constants.TRAINJOB_PLURAL, "patch"),
    # The trainer's result: rank 0's termination message, on the finished TrainJob's pods.
    ("", "pods", "list"),
    # Stepped rollouts: the evaluation gate's Job (distillery-eval), created once and read back; its pods'
    # termination messages carry the scores (pods list above); the garbage collector deletes it.
    ("batch", "jobs", "get"),
    ("batch", "jobs", "create"),
    # Events on the DistilledModels (ours and kopf's warnings).
    ("", "events", "create"),
    # Not needed: kopf's namespace and CRD observers list/watch namespaces and CRDs when allowed and,
    # when forbidden, fall back to the namespaces named on the command line and to discovery at start-up.
    # kopf peering (leader election between replicas): ClusterKopfPeering when watching all namespaces,
    # KopfPeering in each watched namespace otherwise; only with peering on (not --standalone).
    ("kopf.dev", "clusterkopfpeerings", "get"),
    ("kopf.dev", "clusterkopfpeerings", "list"),
    ("kopf.dev", "clusterkopfpeerings", "watch"),
    ("kopf.dev", "clusterkopfpeerings", "patch"),
    ("kopf.dev", "kopfpeerings", "get"),
    ("kopf.dev", "kopfpeerings", "list"),
    ("kopf.dev", "kopfpeerings", "watch"),
    ("kopf.dev", "kopfpeerings", "patch"),
]


def as_rules() -> list[dict[str, list[str]]]:
    """REQUIRED_PERMISSIONS as RBAC PolicyRules (one per apiGroup and resource)."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for group, resource, verb in REQUIRED_PERMISSIONS:
        grouped.setdefault((group, resource), []).append(verb)
    return [
        {"apiGroups": [group], "resources": [resource], "verbs": verbs}
        for (group, resource), verbs in grouped.items()
    ]
