"""The meta-data check shared by the package's checkpoint loaders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffecon.training import latest_checkpoint


def read_meta(directory: str | Path, setting: str, kind: str) -> tuple[int, dict[str, Any]]:
    """``(step, meta)`` of the latest checkpoint in ``directory``, which must hold a ``kind``
    for ``setting``; ``ValueError`` naming the problem otherwise."""
    step = latest_checkpoint(directory)
    if step is None:
        raise ValueError(f"no {kind} checkpoint in {str(directory)!r}")
    path = Path(directory).resolve() / f"step_{step:09d}" / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint {str(path)!r} is corrupt: {err}") from err
    if meta.get("setting") != setting:
        raise ValueError(
            f"checkpoint {str(directory)!r} holds a {kind} for {meta.get('setting')!r}, "
            f"not {setting!r}"
        )
    return step, meta
