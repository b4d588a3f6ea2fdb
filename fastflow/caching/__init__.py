"""Feature caching: skip transformer blocks whose output barely changes between steps.

``pipe(..., cache="fbcache" | "teacache" | "taylorseer" | "dbcache" | "schedule.json" | policy)``;
``cache="ras", ras_ratio=`` (region-adaptive sampling, :mod:`.ras`), alone or around a block policy.
Policies decide per forward which block ranges to compute; the runner drives the model's
``embed`` / ``blocks`` / ``final`` and counts the work (``out.stats``).
"""

from .deepcache import DeepCache, DeepCacheRunner
from .policies import (
    POLICIES,
    TEACACHE_COEFFICIENTS,
    DBCache,
    FBCache,
    Schedule,
    TaylorSeer,
    TeaCache,
    change_reducer,
    relative_change,
    resolve_policy,
)
from .ras import RAS, check_family, resolve_cache
from .runner import CacheRunner, CacheStats, adapter_for

__all__ = [
    "POLICIES",
    "TEACACHE_COEFFICIENTS",
    "CacheRunner",
    "CacheStats",
    "DBCache",
    "DeepCache",
    "DeepCacheRunner",
    "FBCache",
    "RAS",
    "Schedule",
    "TaylorSeer",
    "TeaCache",
    "adapter_for",
    "change_reducer",
    "check_family",
    "relative_change",
    "resolve_cache",
    "resolve_policy",
]
