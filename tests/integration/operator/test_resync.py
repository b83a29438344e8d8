"""The periodic resync is the backstop for changes no event brings: here, a child stripped of the label the
operator watches it by (so its own watch no longer sees it) is restored by the resync timer alone."""

from __future__ import annotations

from typing import Any

import pytest

from distillery_operator import constants

pytestmark = pytest.mark.integration


@pytest.fixture
def operator_settings() -> dict[str, Any]:
    return {"resync_seconds": 1.0}


async def test_resync_restores_a_child_the_watch_cannot_see(cluster, operator, sample_dm) -> None:
    await cluster.apply(sample_dm("r1-resync"))
    original = await cluster.eventually(lambda: cluster.isvc("r1-resync"), what="the child")
    await cluster.patch_isvc("r1-resync", {"metadata": {"labels": {constants.LABEL_MODEL: None}},
                                           "spec": {"predictor": {"minReplicas": 5}}})
    assert constants.LABEL_MODEL not in cluster.isvc("r1-resync")["metadata"]["labels"]
    restored = await cluster.eventually(
        lambda: (i := cluster.isvc("r1-resync"))["metadata"]["labels"].get(constants.LABEL_MODEL) == "r1-resync" and i,
        timeout=8, what="the resync to restore the label",
    )
    assert restored["spec"] == original["spec"]
