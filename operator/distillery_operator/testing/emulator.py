"""A local Kubernetes API for the demo, the benchmark and the integration tests (kmock's emulator, extended).

kmock's KubernetesEmulator stores objects and serves list/watch/get/create/merge-patch/delete, but assigns
no metadata. `ClusterEmulator` adds what an operator relies on, as a real API server does it:
uid, resourceVersion (one counter), generation (bumped by spec changes only), creationTimestamp,
generateName, the status subresource (a status patch changes only status; a main patch never does),
optimistic concurrency (a stale metadata.resourceVersion in a patch is a 409), garbage collection of
objects whose controller owner was deleted, plus fault injection (`fail`) and per-object write counts,
and a bounded request log (kmock's own grows without end and makes every request slower than the last).
It needs kmock (the dev extra); no production module imports it, and the operator image leaves it out.
"""

from __future__ import annotations

import copy
import datetime
import itertools
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import attrs
import kmock
from kmock._internal import dicts, enums, rendering  # kmock's own merge-patch, as its PATCH applies it

from .. import constants
from ..crd import build_crd, build_distillation_crd

DM_RESOURCE = f"{constants.GROUP}/{constants.VERSION}/{constants.PLURAL}"
ISVC_RESOURCE = f"{constants.KSERVE_GROUP}/{constants.KSERVE_VERSION}/{constants.ISVC_PLURAL}"
DJ_RESOURCE = f"{constants.GROUP}/{constants.VERSION}/{constants.DJ_PLURAL}"
TRAINJOB_RESOURCE = f"{constants.TRAINER_GROUP}/{constants.TRAINER_VERSION}/{constants.TRAINJOB_PLURAL}"
PODS_RESOURCE = "v1/pods"
JOBS_RESOURCE = "batch/v1/jobs"
CRD_RESOURCE = "apiextensions.k8s.io/v1/customresourcedefinitions"
EVENTS_RESOURCE = "v1/events"
NAMESPACES_RESOURCE = "v1/namespaces"
WRITE_METHODS = frozenset({"POST", "PATCH", "PUT", "DELETE"})


def _method(request: rendering.Request) -> str:
    return str(getattr(request.method, "value", request.method)).upper()


@dataclass
class Fault:
    """Answer `count` requests matching method/plural (and subresource, when set) with `status`."""

    method: str
    plural: str
    status: int
    count: int
    subresource: str | None = None
    served: int = 0


@attrs.define(kw_only=True)
class ClusterEmulator(kmock.KubernetesEmulator):
    _rv: Any = attrs.field(factory=lambda: itertools.count(1), init=False)
    faults: list[Fault] = attrs.field(factory=list, init=False)
    writes: Counter[tuple[str, str, str]] = attrs.field(factory=Counter, init=False)  # (plural, ns, name)
    requests: Counter[tuple[str, str, str]] = attrs.field(factory=Counter, init=False)  # (method, plural, sub)
    first_seen: dict[tuple[str, str, str], float] = attrs.field(factory=dict, init=False)
    # kmock records every request and, to route each new one, scans that whole record once per reaction:
    # O(requests so far) per request, which is why it slows down as a run goes on. With `bounded_log` the
    # record keeps only the requests still in flight (all that routing needs); False keeps kmock's.
    bounded_log: bool = True
    # Resources this cluster does not serve (an API group not installed): every request for one is a 404,
    # as a real API server answers (kmock itself would accept them).
    absent: set[str] = attrs.field(factory=set, init=False)
    _inflight: dict[int, rendering.Request] = attrs.field(factory=dict, init=False)

    # --------------------------------------------------------------------------------- set-up
    def register_distillery(self, *, trainer: bool = True) -> None:
        """Make DistilledModels, DistillationJobs, InferenceServices, Pods and Events known (discovery + CRD
        objects), and TrainJobs unless `trainer` is False (a cluster without Kubeflow Trainer)."""
        crd = build_crd()
        names = crd["spec"]["names"]
        self.resources[DM_RESOURCE] = kmock.ResourceInfo(
            kind=names["kind"], singular=names["singular"], namespaced=True,
            shortnames=set(names.get("shortNames", [])), categories=set(names.get("categories", [])),
            verbs={"get", "list", "watch", "create", "patch", "delete"}, subresources={"status", "scale"},
        )
        dj_crd = build_distillation_crd()
        dj_names = dj_crd["spec"]["names"]
        self.resources[DJ_RESOURCE] = kmock.ResourceInfo(
            kind=dj_names["kind"], singular=dj_names["singular"], namespaced=True,
            shortnames=set(dj_names.get("shortNames", [])), categories=set(dj_names.get("categories", [])),
            verbs={"get", "list", "watch", "create", "patch", "delete"}, subresources={"status"},
        )
        if trainer:
            self.resources[TRAINJOB_RESOURCE] = kmock.ResourceInfo(
                kind=constants.TRAINJOB_KIND, singular="trainjob", namespaced=True,
                verbs={"get", "list", "watch", "create", "patch", "delete"}, subresources={"status"},
            )
        else:
            self.absent.add(TRAINJOB_RESOURCE)
        self.resources[PODS_RESOURCE] = kmock.ResourceInfo(
            kind="Pod", singular="pod", namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"},
            subresources={"status"},
        )
        self.resources[JOBS_RESOURCE] = kmock.ResourceInfo(  # the rollouts' evaluation Jobs
            kind="Job", singular="job", namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"},
            subresources={"status"},
        )
        self.resources[ISVC_RESOURCE] = kmock.ResourceInfo(
            kind=constants.ISVC_KIND, singular="inferenceservice", namespaced=True, shortnames={"isvc"},
            verbs={"get", "list", "watch", "create", "patch", "delete"}, subresources={"status"},
        )
        self.resources[EVENTS_RESOURCE] = kmock.ResourceInfo(
            kind="Event", singular="event", namespaced=True, verbs={"create", "get", "list", "watch"}
        )
        self.resources[CRD_RESOURCE] = kmock.ResourceInfo(
            kind="CustomResourceDefinition", singular="customresourcedefinition", namespaced=False,
            verbs={"get", "list", "watch", "create"},
        )
        self.resources[NAMESPACES_RESOURCE] = kmock.ResourceInfo(
            kind="Namespace", singular="namespace", namespaced=False, verbs={"get", "list", "watch", "create"}
        )
        self.objects[CRD_RESOURCE, None, crd["metadata"]["name"]] = self._stamp(copy.deepcopy(crd), None)
        self.objects[CRD_RESOURCE, None, dj_crd["metadata"]["name"]] = self._stamp(copy.deepcopy(dj_crd), None)
        self.add_namespace("default")

    def add_namespace(self, name: str) -> None:
        obj = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}, "status": {"phase": "Active"}}
        self.objects[NAMESPACES_RESOURCE, None, name] = self._stamp(obj, None)

    def fail(self, method: str, plural: str, status: int, count: int, subresource: str | None = None) -> Fault:
        fault = Fault(method.upper(), plural, status, count, subresource)
        self.faults.append(fault)
        return fault

    # --------------------------------------------------------------------------------- helpers
    def _next_rv(self) -> str:
        return str(next(self._rv))

    def _stamp(self, obj: dict[str, Any], namespace: str | None) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:8]}"
        if namespace and not meta.get("namespace"):
            meta["namespace"] = namespace
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = self._next_rv()
        meta["generation"] = 1
        meta["creationTimestamp"] = (
            datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
        )
        return obj

    def read(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The stored object (a deep copy), or None."""
        key = (kmock.resource(resource), namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    def names(self, resource: str, namespace: str | None = None) -> list[str]:
        res = kmock.resource(resource)
        return [
            name for (r, ns, name), obj in list(self.objects.items())
            if r == res and (namespace is None or ns == namespace) and not obj.deleted
        ]

    def _fault(self, request: rendering.Request) -> Fault | None:
        if request.resource is None:
            return None
        for fault in self.faults:
            if (
                fault.served < fault.count
                and fault.method == _method(request)
                and fault.plural == request.resource.plural
                and (fault.subresource is None or fault.subresource == request.subresource)
            ):
                fault.served += 1
                return fault
        return None

    # --------------------------------------------------------------------------------- the API
    async def _handle(self, request: rendering.Request) -> Any:
        self._inflight[id(request)] = request
        try:
            if self.bounded_log and len(self._requests) > 2 * len(self._inflight) + 16:
                self._requests[:] = [r for r in self._requests if id(r) in self._inflight]
            return await self._handle_stamped(request)
        finally:
            self._inflight.pop(id(request), None)

    async def _handle_stamped(self, request: rendering.Request) -> Any:
        if request.resource is not None:
            self.requests[(_method(request), str(request.resource.plural), request.subresource or "")] += 1
        if request.resource is not None and any(request.resource == kmock.resource(r) for r in self.absent):
            raise kmock.KubernetesError(status=404, reason="NotFound",
                                        message="the server could not find the requested resource")
        fault = self._fault(request)
        if fault is not None:
            raise kmock.KubernetesError(status=fault.status, reason="Injected", message=f"injected HTTP {fault.status}")
        res = request.resource
        deleted_uid: str | None = None
        if res is not None and request.action == enums.action.CREATE and isinstance(request.data, dict):
            self._stamp(request.data, request.namespace)
        elif res is not None and request.action == enums.action.UPDATE and request.name is not None:
            self._prepare_patch(request)
        elif res is not None and request.action == enums.action.DELETE and request.name is not None:
            key = (res, request.namespace, request.name)
            if key in self.objects and not self.objects[key].deleted:
                deleted_uid = (self.objects[key].raw.get("metadata") or {}).get("uid")
        if res is not None and _method(request) in WRITE_METHODS:
            name = request.name
            if name is None and isinstance(request.data, dict):
                name = (request.data.get("metadata") or {}).get("name")
            self.writes[(str(res.plural), str(request.namespace), str(name))] += 1
        response = await super()._handle(request)
        if res is not None and request.action == enums.action.CREATE and isinstance(request.data, dict):
            meta = request.data.get("metadata") or {}
            self.first_seen.setdefault((str(res.plural), str(meta.get("namespace")), str(meta.get("name"))),
                                       time.perf_counter())
        if deleted_uid:
            await self._collect_garbage(deleted_uid)
        return response

    def _prepare_patch(self, request: rendering.Request) -> None:
        """Status-subresource semantics, resourceVersion/generation bumps, optimistic concurrency."""
        assert request.resource is not None and request.name is not None
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return  # kmock answers 404
        current = self.objects[key].raw
        meta = current.get("metadata") or {}
        rv = self._next_rv()
        if isinstance(request.data, list):  # a JSON patch (kopf uses them for finalizers)
            request.data.append({"op": "replace", "path": "/metadata/resourceVersion", "value": rv})
            return
        if not isinstance(request.data, dict):
            return
        patch = request.data
        expected = (patch.get("metadata") or {}).get("resourceVersion")
        if expected is not None and expected != meta.get("resourceVersion"):
            raise kmock.KubernetesError(status=409, reason="Conflict", message="the object has been modified")
        info = self.resources.get(request.resource, None)
        has_status = isinstance(info, kmock.ResourceInfo) and "status" in info.subresources
        if has_status and request.subresource == "status":
            for key_ in list(patch):
                if key_ != "status":
                    del patch[key_]
        elif has_status:
            patch.pop("status", None)
        result = dicts.patch_dict(copy.deepcopy(current), copy.deepcopy(patch))
        new_meta: dict[str, Any] = {"resourceVersion": rv}
        if result.get("spec") != current.get("spec"):
            new_meta["generation"] = int(meta.get("generation") or 0) + 1
        patch.setdefault("metadata", {})
        if patch["metadata"] is None:
            patch["metadata"] = {}
        patch["metadata"].update(new_meta)

    async def _collect_garbage(self, owner_uid: str) -> None:
        """Delete what the deleted object controlled (the garbage collector's background deletion)."""
        async with self._lock:
            for (res, _ns, _name), obj in list(self.objects.items()):
                if obj.deleted:
                    continue
                refs = (obj.raw.get("metadata") or {}).get("ownerReferences") or []
                if any(isinstance(r, Mapping) and r.get("uid") == owner_uid for r in refs):
                    raw = obj.raw
                    obj.delete()
                    await self._buses[res].put({"type": "DELETED", "object": raw})
