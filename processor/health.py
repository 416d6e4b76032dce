"""Liveness and readiness facts: what the daemon writes to its status file and the web reads.

``/healthz`` asks whether a daemon's compute loop ticks: its status file (rewritten every
second by the housekeeper) is fresh, and the loop showed a sign of life (an idle round, a
progress report, a model load) within ``stall_seconds``, the time after which the heartbeat
stops renewing its leases too. ``/readyz`` asks whether work can be done: the engine is
importable (or created) and the inbox is there.
"""

from __future__ import annotations

import importlib.util
import sys
from datetime import datetime, timedelta
from typing import Any, Optional

from config import Settings

FRESH_SECONDS = 15.0


def gpu_memory() -> Optional[dict[str, int]]:
    """Bytes of CUDA memory allocated and reserved by this process, and the device's total;
    None unless torch is imported (never imports it, nor touches a module still being imported
    by another thread) and CUDA is initialised."""
    torch, cuda = sys.modules.get("torch"), sys.modules.get("torch.cuda")
    if torch is None or cuda is None or any(getattr(getattr(m, "__spec__", None), "_initializing", False)
                                            for m in (torch, cuda)):
        return None
    try:
        if not cuda.is_initialized():
            return None
        device = cuda.current_device()
        return {"allocated": int(cuda.memory_allocated(device)), "reserved": int(cuda.memory_reserved(device)),
                "total": int(cuda.get_device_properties(device).total_memory)}
    except (AttributeError, RuntimeError):
        return None


def _parse(stamp: Any) -> Optional[datetime]:
    try:
        return datetime.fromisoformat(str(stamp).rstrip("Z"))
    except ValueError:
        return None


def daemon_health(status: dict[str, Any], now: datetime) -> tuple[bool, str]:
    """Whether the daemon that wrote ``status`` is alive and its loop ticks, and why not."""
    if status.get("doing") == "stopped":
        return False, "stopped"
    updated = _parse(status.get("updated_at"))
    if updated is None or now - updated > timedelta(seconds=FRESH_SECONDS):
        return False, f"no status for more than {FRESH_SECONDS:.0f} s (process gone or hung)"
    loop_at = _parse(status.get("loop_at"))
    stall = float(status.get("stall_seconds") or 600)
    if loop_at is not None and now - loop_at > timedelta(seconds=stall):
        return False, f"the compute loop showed no sign of life for more than {stall:.0f} s"
    return True, "ok"


def readiness(settings: Settings, engine_created: bool = False) -> tuple[bool, dict[str, str]]:
    """Whether jobs can be worked on: the engine created or importable, the inbox present."""
    checks: dict[str, str] = {}
    ok = True
    if engine_created:
        checks["engine"] = f"{settings.engine}: created"
    else:
        problem = engine_missing(settings.engine)
        ok = problem is None
        checks["engine"] = f"{settings.engine}: " + ("installed" if ok else problem)
    if settings.inbox.is_dir():
        checks["inbox"] = f"{settings.inbox}: present"
    else:
        ok = False
        checks["inbox"] = f"{settings.inbox}: missing"
    return ok, checks


ENGINE_LIBRARIES = {"diffusers": ("torch", "diffusers", "transformers"), "comfyui": ("torch",), "fake": ("numpy",)}


def engine_missing(name: str) -> Optional[str]:
    """What keeps engine ``name`` from being imported (None: nothing), found without importing
    it (a web process need not load torch to tell)."""
    from stages.engine import ENGINES
    if name not in ENGINES:
        return f"unknown engine {name!r}"
    for module in (ENGINES[name].split(":")[0], *ENGINE_LIBRARIES.get(name, ())):
        try:
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed"
        except (ImportError, ValueError) as exc:
            return f"{module}: {exc}"
    return None
