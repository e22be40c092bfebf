"""Champion/challenger promotion (filled in by the lifecycle work)."""
from __future__ import annotations


def champion_challenger(cfg, name: str, version: str) -> dict:
    return {"promoted": False, "decision": f"version {version} registered as challenger; champion unchanged"}
