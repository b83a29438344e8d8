"""`make demo`, operator part: the real operator at work without a cluster.

Starts kmock's Kubernetes emulator on 127.0.0.1 (a free port), registers the DistilledModel and
InferenceService resources, runs the operator (kopf) against it, applies manifests/samples/*.yaml,
prints the InferenceServices the operator created and a `kubectl get dm` table, plays KServe (marks
every InferenceService Ready with a URL), prints the table again, deletes one InferenceService by hand
to show it restored, and stops.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import sys
import time
from pathlib import Path
from typing import Any

import kmock
import kopf
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "operator"))

from distillery_operator.runner import OperatorThread  # noqa: E402
from distillery_operator.settings import OperatorSettings  # noqa: E402
from distillery_operator.testing.emulator import DM_RESOURCE, ISVC_RESOURCE, ClusterEmulator  # noqa: E402

COLUMNS = ("NAME", "READY", "PHASE", "URL", "GPU", "QUANT", "MIN", "MAX", "AGE")


def age(timestamp: str | None) -> str:
    if not timestamp:
        return ""
    born = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    seconds = int((datetime.datetime.now(datetime.UTC) - born).total_seconds())
    return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m"


def table(models: list[dict[str, Any]]) -> str:
    """What `kubectl get dm` prints, from the CRD's printer columns."""
    rows = [COLUMNS]
    for dm in models:
        status = dm.get("status") or {}
        ready = next((c["status"] for c in status.get("conditions") or [] if c.get("type") == "Ready"), "")
        auto = (dm.get("spec") or {}).get("autoscaling") or {}
        rows.append((
            dm["metadata"]["name"], ready, status.get("phase") or "", status.get("url") or "",
            status.get("gpu") or "", status.get("quantization") or "",
            str(auto.get("minReplicas", "")), str(auto.get("maxReplicas", "")),
            age(dm["metadata"].get("creationTimestamp")),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


async def wait_for(check: Any, what: str, timeout: float = 30.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    samples = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "manifests" / "samples").glob("*.yaml"))]
    keys = [(s["metadata"].get("namespace") or "default", s["metadata"]["name"]) for s in samples]

    async with ClusterEmulator() as emu, kmock.Server(emu) as server:
        emu.register_distillery()
        url = str(server.url).rstrip("/")
        print(f"== Kubernetes API emulator (kmock) at {url}")
        # the cluster the samples are written for has Prometheus (the rollout sample's SLO gates need it; no
        # rollout starts here, since no spec changes after creation, so nothing is queried)
        settings = OperatorSettings(metrics_port=0, liveness_port=0, standalone=True, log_format="text",
                                    log_level="WARNING", rollout_analysis_enabled=True)
        operator = OperatorThread(settings, kopf.ConnectionInfo(server=url, insecure=True))
        await asyncio.to_thread(operator.start)
        print("== operator running (distillery_operator.runner, kopf, standalone, all namespaces)")
        try:
            for sample, (ns, name) in zip(samples, keys, strict=True):
                async with emu.post(f"/apis/distillery.dev/v1alpha1/namespaces/{ns}/distilledmodels", json=sample) as r:
                    assert r.status < 300, await r.text()
                print(f"distilledmodel.distillery.dev/{name} created")

            def deploying() -> bool:
                return all(((emu.read(DM_RESOURCE, ns, n) or {}).get("status") or {}).get("phase") == "Deploying"
                           and emu.read(ISVC_RESOURCE, ns, n) for ns, n in keys)

            await wait_for(deploying, "the InferenceServices")
            print("\n== InferenceServices created by the operator")
            for ns, name in keys:
                isvc = emu.read(ISVC_RESOURCE, ns, name)
                print("---")
                print(yaml.safe_dump(isvc, sort_keys=False).rstrip())
            print("\n== kubectl get dm")
            print(table([emu.read(DM_RESOURCE, ns, n) or {} for ns, n in keys]))

            print("\n== playing KServe: every InferenceService becomes Ready with a URL")
            for ns, name in keys:
                status = {
                    "url": f"http://{name}.{ns}.example.com",
                    "conditions": [{"type": t, "status": "True"} for t in ("IngressReady", "PredictorReady", "Ready")],
                    "modelStatus": {"transitionStatus": "UpToDate", "states": {"activeModelState": "Loaded"}},
                }
                path = f"/apis/serving.kserve.io/v1beta1/namespaces/{ns}/inferenceservices/{name}/status"
                async with emu.patch(path, json={"status": status},
                                     headers={"Content-Type": "application/merge-patch+json"}) as r:
                    assert r.status < 300, await r.text()
            await wait_for(lambda: all(((emu.read(DM_RESOURCE, ns, n) or {}).get("status") or {}).get("phase")
                                       == "Ready" for ns, n in keys), "phase Ready")
            print("\n== kubectl get dm")
            print(table([emu.read(DM_RESOURCE, ns, n) or {} for ns, n in keys]))

            ns, name = keys[0]
            old_uid = (emu.read(ISVC_RESOURCE, ns, name) or {})["metadata"]["uid"]
            async with emu.delete(f"/apis/serving.kserve.io/v1beta1/namespaces/{ns}/inferenceservices/{name}") as r:
                assert r.status < 300
            started = time.monotonic()
            await wait_for(lambda: (emu.read(ISVC_RESOURCE, ns, name) or {}).get("metadata", {}).get("uid")
                           not in (None, old_uid), "the restored InferenceService")
            print(f"\n== kubectl delete isvc {name}: the operator restored it in {time.monotonic() - started:.2f} s")
            print("\n== API writes per object, all clients (the samples' POST, KServe's status, the operator's writes)")
            for (plural, wns, wname), count in sorted(emu.writes.items()):
                if plural in ("distilledmodels", "inferenceservices"):
                    print(f"  {plural}/{wns}/{wname}: {count}")
        finally:
            await asyncio.to_thread(operator.stop)
            print("\n== operator stopped")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
