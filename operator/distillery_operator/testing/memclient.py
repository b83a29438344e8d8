"""An in-process KubeClient: the Kubernetes API replaced at the client boundary by a dict.

For unit tests of the reconciler and for the operator's CPU benchmark. It behaves like the API server in
what the reconciler relies on: create answers 409 when the object exists, patch is a JSON merge patch
(null deletes) that answers 404 when it does not, a status patch changes only status, metadata is
assigned (uid, resourceVersion, generation). Every call is recorded; `fail` injects error answers.
"""

from __future__ import annotations

import copy
import itertools
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..reconcile import ApiError, Ref, has_labels


def merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge(result.get(key), value)
    return result


@dataclass
class Call:
    verb: str  # get | create | patch | event | list
    plural: str
    name: str
    subresource: str | None = None
    body: Any = None


@dataclass
class MemoryClient:
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    events: list[tuple[str, str, str, str]] = field(default_factory=list)  # (object name, type, reason, message)
    faults: list[list[Any]] = field(default_factory=list)  # [verb, plural, status, remaining]
    record: bool = True
    _rv: Any = field(default_factory=lambda: itertools.count(1))

    # ---------------------------------------------------------------------------------- set-up
    def put(self, ref: Ref, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Store an object as if it had been created (metadata assigned); returns the stored copy."""
        stored = copy.deepcopy(dict(obj))
        meta = stored.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("generation", 1)
        meta["resourceVersion"] = str(next(self._rv))
        self.objects[(ref.plural, meta["namespace"], meta["name"])] = stored
        return copy.deepcopy(stored)

    def fail(self, verb: str, plural: str, status: int, count: int = 1) -> None:
        self.faults.append([verb, plural, status, count])

    def writes(self, plural: str | None = None) -> list[Call]:
        return [c for c in self.calls if c.verb in ("create", "patch") and (plural is None or c.plural == plural)]

    def _check(self, verb: str, plural: str) -> None:
        for fault in self.faults:
            if fault[0] == verb and fault[1] == plural and fault[3] > 0:
                fault[3] -= 1
                raise ApiError(fault[2], f"injected {fault[2]}")

    def _log(self, call: Call) -> None:
        if self.record:
            self.calls.append(call)

    # ---------------------------------------------------------------------------------- KubeClient
    async def get(self, ref: Ref, namespace: str, name: str) -> dict[str, Any] | None:
        self._log(Call("get", ref.plural, name))
        self._check("get", ref.plural)
        obj = self.objects.get((ref.plural, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    async def create(self, ref: Ref, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        name = str(body["metadata"]["name"])
        self._log(Call("create", ref.plural, name, body=body))
        self._check("create", ref.plural)
        if (ref.plural, namespace, name) in self.objects:
            raise ApiError(409, f"{ref.plural} {name} already exists")
        return self.put(ref, {**body, "metadata": {**body["metadata"], "namespace": namespace}})

    async def patch(
        self, ref: Ref, namespace: str, name: str, patch: Mapping[str, Any], subresource: str | None = None
    ) -> dict[str, Any]:
        self._log(Call("patch", ref.plural, name, subresource, patch))
        self._check("patch", ref.plural)
        key = (ref.plural, namespace, name)
        if key not in self.objects:
            raise ApiError(404, f"{ref.plural} {name} not found")
        current = self.objects[key]
        if subresource == "status":
            patch = {"status": patch.get("status")}
        else:
            patch = {k: v for k, v in patch.items() if k != "status"}
        updated = merge(current, patch)
        meta = updated["metadata"]
        meta["resourceVersion"] = str(next(self._rv))
        if updated.get("spec") != current.get("spec"):
            meta["generation"] = int(meta.get("generation") or 0) + 1
        self.objects[key] = updated
        return copy.deepcopy(updated)

    async def list(self, ref: Ref, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        self._log(Call("list", ref.plural, ""))
        self._check("list", ref.plural)
        return [copy.deepcopy(obj) for (plural, ns, _), obj in self.objects.items()
                if plural == ref.plural and ns == namespace and has_labels(obj, labels)]

    async def event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        name = str((involved.get("metadata") or {}).get("name"))
        self._log(Call("event", "events", name, body=(type_, reason, message)))
        self.events.append((name, type_, reason, message))
