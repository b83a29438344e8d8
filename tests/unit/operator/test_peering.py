"""Peering: replicas of one Deployment must not share a kopf priority (kopf pauses all of them if they do)."""

from __future__ import annotations

from distillery_operator.runner import peering_priority
from distillery_operator.settings import OperatorSettings


def test_replicas_draw_distinct_priorities():
    settings = OperatorSettings()
    drawn = {peering_priority(settings) for _ in range(50)}
    assert len(drawn) > 45  # collisions are possible but rare; equal for all would freeze every replica


def test_priority_can_be_pinned(monkeypatch):
    monkeypatch.setenv("DISTILLERY_PEERING_PRIORITY", "7")
    assert peering_priority(OperatorSettings()) == 7
