"""The Python client of the mrl-retrieval service (``mrl serve``): sync and async, typed results."""

from __future__ import annotations

from mrl_client.client import AsyncMrlClient, MrlAPIError, MrlClient
from mrl_client.models import (
    CompactResponse,
    Dim,
    DimsResponse,
    HealthResponse,
    Hit,
    ModelCard,
    ModelsResponse,
    Plan,
    PlansResponse,
    PlanUsed,
    QueryHits,
    ReloadResponse,
    SearchResponse,
    Timings,
    WriteResponse,
)

__all__ = [
    "AsyncMrlClient",
    "CompactResponse",
    "Dim",
    "DimsResponse",
    "HealthResponse",
    "Hit",
    "ModelCard",
    "ModelsResponse",
    "MrlAPIError",
    "MrlClient",
    "Plan",
    "PlanUsed",
    "PlansResponse",
    "QueryHits",
    "ReloadResponse",
    "SearchResponse",
    "Timings",
    "WriteResponse",
]
