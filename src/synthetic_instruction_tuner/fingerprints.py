"""Fingerprints: which settings and which upstream artifacts a step's outputs were produced from.

A step declares the settings it reads (dotted keys or whole sections of the config). Its fingerprint
is those settings' values plus a content hash (sha256 and size) of every input file. The orchestrator
records the fingerprint in `<run dir>/state/<step>.json`: with status "running" before the step
starts, and "complete" once it has finished. A step is complete only if the recorded fingerprint
equals the one computed now, so a changed setting or a changed upstream artifact makes it pending,
and the record names what changed.

Settings that decide *how* a step runs but not *what* it produces are left out, so that changing
them never throws work away: batch sizes (the engine halves its own batch size on a timeout or an
out-of-memory error, so the data is not a function of it), thread counts, progress bars, timeouts,
checkpoint and logging intervals, gradient checkpointing and the dense LM head (same numbers).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .config import Config
from .store import read_json, write_json

STATE_DIR = "state"

# Keys inside declared sections that change how a step runs, not what it writes.
NOT_OUTPUT_KEYS = frozenset(
    {
        "magpie.max_attempts_factor",  # when to give up, not what is kept
        "preferences.reward_batch_size",
        "sft.per_device_eval_batch_size",
        "sft.gradient_checkpointing",  # recomputes activations: same numbers, less memory
        "sft.logging_steps",
        "sft.save_steps",  # checkpoint interval: lowering it after a disconnect must resume, not restart
        "sft.eval_steps",  # evaluating reads the adapter, it does not change it
        "dpo.gradient_checkpointing",
        "dpo.logging_steps",
        "dpo.save_steps",
        "evaluation.batch_size",
    }
)


def _jsonable(value: Any) -> Any:
    """Compare in JSON terms, as recorded on disk (tuples become lists, 2e-4 stays 0.0002)."""
    return json.loads(json.dumps(value, default=str))


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def settings_of(cfg: Config, keys: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The values of the declared keys (a key may name a whole section), as dotted key -> value."""
    flat = _flatten(cfg.to_dict())
    chosen = {k: v for k, v in flat.items() if k not in NOT_OUTPUT_KEYS and under(k, keys)}
    return _jsonable(dict(sorted(chosen.items())))


def under(key: str, keys: tuple[str, ...] | list[str]) -> bool:
    """Whether a dotted key is one of `keys` or inside a section they name."""
    return any(key == p or key.startswith(p + ".") for p in keys)


def file_digest(path: Path, size: int | None = None) -> dict[str, Any] | None:
    """sha256 and size of a file (of its first `size` bytes if given); None if it does not exist."""
    if not path.is_file():
        return None
    h = hashlib.sha256()
    left = path.stat().st_size if size is None else size
    read = 0
    with open(path, "rb") as fh:
        while left > 0:
            chunk = fh.read(min(1 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            read += len(chunk)
            left -= len(chunk)
    return {"sha256": h.hexdigest(), "bytes": read}


def fingerprint(
    cfg: Config, root: Path, settings: tuple[str, ...], inputs: tuple[str, ...]
) -> dict[str, Any]:
    return {
        "settings": settings_of(cfg, settings),
        "inputs": {name: file_digest(root / name) for name in inputs},
    }


def state_path(root: Path, step: str) -> Path:
    return root / STATE_DIR / f"{step}.json"


def read_state(root: Path, step: str) -> dict[str, Any] | None:
    """The recorded state of a step, or None if there is none (or it cannot be read)."""
    path = state_path(root, step)
    if not path.exists():
        return None
    try:
        state = read_json(path)
    except Exception:  # written atomically, so unreadable means edited by hand: treat as missing
        return None
    return state if isinstance(state, dict) and "settings" in state and "inputs" in state else None


def write_state(root: Path, step: str, fp: dict[str, Any], status: str) -> None:
    from .ledger import now_iso

    write_json(state_path(root, step), {"step": step, "status": status, "updated": now_iso(), **fp})


def clear_state(root: Path, step: str) -> None:
    state_path(root, step).unlink(missing_ok=True)


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shown(settings: dict[str, Any], key: str) -> str:
    return _short(settings[key]) if key in settings else "(unset)"


def changed_keys(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Every setting that differs, added and removed keys included, sorted. A key absent on one side
    and null on the other is no change: a new setting arrives with null for "off", and a run recorded
    before it existed must not be redone for it."""
    return sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))


def changed_settings(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key old → new` for every setting that differs (added and removed keys included)."""
    return [
        f"{key} {_shown(recorded, key)} → {_shown(current, key)}" for key in changed_keys(recorded, current)
    ]


def changed_inputs(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return sorted(name for name in set(recorded) | set(current) if recorded.get(name) != current.get(name))


def only_appended(root: Path, name: str, recorded: dict[str, Any] | None) -> bool:
    """True if the file still starts with exactly the bytes recorded (rows were appended, none changed)."""
    if not recorded:
        return False
    now = file_digest(root / name, size=recorded["bytes"])
    return now is not None and now == recorded
