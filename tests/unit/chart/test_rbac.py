"""The operator's RBAC is least privilege: every call it makes is granted, nothing else is.

The operator's own list of API calls (group, resource, verb) is the reference; the chart's rules
bound to the operator's ServiceAccount must cover it exactly, in the right scope (a ClusterRole when
watching all namespaces, Roles in the watched namespaces otherwise), plus kopf's peering object
when peering is on. No wildcards, no built-in powerful roles, nothing that escalates.
"""

from __future__ import annotations

from typing import Any

from distillery_operator.rbac import REQUIRED_PERMISSIONS

Triple = tuple[str, str, str]
DANGEROUS_VERBS = {"*", "escalate", "bind", "impersonate", "approve", "sign"}
POWERFUL_ROLES = {"cluster-admin", "admin", "edit"}


def peering_permissions(cluster_wide: bool) -> set[Triple]:
    """The operator's kopf.dev permissions for its scope: ClusterKopfPeering or KopfPeering."""
    resource = "clusterkopfpeerings" if cluster_wide else "kopfpeerings"
    return {t for t in REQUIRED_PERMISSIONS if t[0] == "kopf.dev" and t[1] == resource}


def required(cluster_wide: bool, peering: bool) -> set[Triple]:
    base = {t for t in REQUIRED_PERMISSIONS if t[0] != "kopf.dev"}
    return base | (peering_permissions(cluster_wide) if peering else set())


def test_required_permissions_are_well_formed() -> None:
    assert len(set(REQUIRED_PERMISSIONS)) == len(REQUIRED_PERMISSIONS)
    for group, resource, verb in REQUIRED_PERMISSIONS:
        assert "*" not in (group, resource, verb)
    assert peering_permissions(True) and peering_permissions(False)


def expand(rules: list[dict[str, Any]]) -> set[Triple]:
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def operator_grants(rendered) -> dict[str | None, set[Triple]]:
    """Scope (None: cluster-wide, else a namespace) -> what the operator's ServiceAccount may do there."""
    pod = rendered.deployment["spec"]["template"]["spec"]
    sa = (pod["serviceAccountName"], rendered.deployment["metadata"]["namespace"])
    grants: dict[str | None, set[Triple]] = {}
    for binding in rendered.of_kind("ClusterRoleBinding") + rendered.of_kind("RoleBinding"):
        subjects = {
            (s["name"], s.get("namespace"))
            for s in binding.get("subjects", [])
            if s["kind"] == "ServiceAccount"
        }
        if sa not in subjects:
            continue
        ref = binding["roleRef"]
        assert ref["name"] not in POWERFUL_ROLES and not ref["name"].startswith("system:"), ref
        scope = binding["metadata"].get("namespace")
        roles = [
            r
            for r in rendered.of_kind(ref["kind"])
            if r["metadata"]["name"] == ref["name"]
            and r["metadata"].get("namespace") == (scope if ref["kind"] == "Role" else None)
        ]
        assert len(roles) == 1, f"{binding['metadata']['name']} binds {ref} which the chart does not create"
        grants.setdefault(scope, set()).update(expand(roles[0]["rules"]))
    return grants


def missing_and_extra(grants: set[Triple], needed: set[Triple]) -> tuple[set[Triple], set[Triple]]:
    return needed - grants, grants - needed


def test_operator_rbac_is_exactly_what_it_calls(rendered) -> None:
    values = rendered.values
    cluster_wide = values["operator"]["watch"]["allNamespaces"]
    peering = values["operator"]["peering"]["enabled"] or values["operator"]["replicas"] > 1
    grants = operator_grants(rendered)
    if cluster_wide:
        assert set(grants) == {None}, "cluster-wide watch: one ClusterRole, no namespaced grants"
        assert not rendered.of_kind("Role")
    else:
        watched = values["operator"]["watch"]["namespaces"] or ["distillery-system"]
        assert set(grants) == set(watched), (
            "namespaced watch: a Role in each watched namespace, nothing cluster-wide"
        )
    needed = required(cluster_wide, peering)
    for scope, granted in grants.items():
        missing, extra = missing_and_extra(granted, needed)
        assert not missing, (
            f"{scope or 'cluster'}: the operator calls {sorted(missing)} but is not allowed to"
        )
        assert not extra, f"{scope or 'cluster'}: granted {sorted(extra)} which the operator never calls"


def test_the_coverage_check_can_fail() -> None:
    needed = required(cluster_wide=True, peering=True)
    granted = set(needed)
    granted.discard(("serving.kserve.io", "inferenceservices", "patch"))
    granted.add(("", "secrets", "get"))
    missing, extra = missing_and_extra(granted, needed)
    assert missing == {("serving.kserve.io", "inferenceservices", "patch")}
    assert extra == {("", "secrets", "get")}


def test_no_wildcards_or_escalation_anywhere(rendered) -> None:
    for role in rendered.of_kind("ClusterRole") + rendered.of_kind("Role"):
        assert "aggregationRule" not in role, role["metadata"]["name"]
        for rule in role["rules"]:
            assert "nonResourceURLs" not in rule
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], f"{role['metadata']['name']}: wildcard in {key}"
            assert not DANGEROUS_VERBS & set(rule["verbs"]), rule
            assert not {"secrets", "pods/exec", "serviceaccounts/token"} & set(rule["resources"]), rule
    for binding in rendered.of_kind("ClusterRoleBinding") + rendered.of_kind("RoleBinding"):
        assert binding["roleRef"]["name"] not in POWERFUL_ROLES


def test_user_roles_aggregate_only_distilledmodel_access(render_chart) -> None:
    r = render_chart("default")
    user_roles = [
        c
        for c in r.of_kind("ClusterRole")
        if any(k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in c["metadata"]["labels"])
    ]
    assert {c["metadata"]["name"] for c in user_roles} == {"distillery-view", "distillery-edit"}
    for role in user_roles:
        assert {g for rule in role["rules"] for g in rule["apiGroups"]} == {"distillery.dev"}
    edit = next(c for c in user_roles if c["metadata"]["name"] == "distillery-edit")
    assert ("distillery.dev", "distilledmodels/scale", "update") in expand(edit["rules"])  # kubectl scale dm
    assert "rbac.authorization.k8s.io/aggregate-to-view" not in edit["metadata"]["labels"]
    assert not [c for c in render_chart("release-namespace").of_kind("ClusterRole")]
