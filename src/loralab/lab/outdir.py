"""The output directory of a comparison: its run dirs and the lab's own state.

``<out>/.lab/lab.json`` records which comparison the directory holds (its
fingerprint) and which runs finished, so a re-run skips them, redoes failed or
interrupted ones, and refuses to mix two different comparisons.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from loralab.errors import LoralabError
from loralab.io import atomic_write_json
from loralab.lab.plan import Plan, differing

LAB_DIR = ".lab"


def state_path(output: Path) -> Path:
    return output / LAB_DIR / "lab.json"


def read_state(output: Path) -> dict | None:
    path = state_path(output)
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return state if isinstance(state, dict) else None


def _describe(state: dict, plan: Plan) -> str:
    """What differs: the kind, a data file's content, or the settings named."""
    if state.get("kind") != plan.kind:
        return f"a {state.get('kind')}, not a {plan.kind}"
    keys = differing(state.get("settings") or {}, plan.shared())
    if keys:
        return "differs in " + ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
    changed = [k for k, v in plan.files().items() if (state.get("files") or {}).get(k) != v]
    if changed:
        return f"the content of {', '.join(changed)} changed"
    return "made with other settings"


def open_output(plan: Plan, overwrite: bool) -> dict:
    """Check the output dir fits this comparison and return its state.

    Refuses (nothing touched) when it holds a different comparison, unless
    ``overwrite``; never deletes a folder that is not a loralab output."""
    out = plan.output
    if out.exists() and not out.is_dir():
        raise LoralabError(f"output {out} is a file. Choose a directory with --output.")
    state = read_state(out)
    busy = out.is_dir() and any(out.iterdir())
    if busy and state is None:
        raise LoralabError(f"output directory {out} holds files that are not a loralab "
                           "comparison. Choose a new or empty --output directory.")
    fingerprint = plan.fingerprint()
    if state is not None and (overwrite or state.get("fingerprint") != fingerprint):
        if not overwrite:
            raise LoralabError(
                f"output directory {out} holds a different comparison "
                f"({_describe(state, plan)}). "
                "Pass --overwrite to replace it, or choose another --output.")
        shutil.rmtree(out)
        state = None
    if state is None:
        state = {"kind": plan.kind, "fingerprint": fingerprint, "settings": plan.shared(),
                 "files": plan.files(), "runs": {}}
        save_state(out, state)
    return state


def save_state(output: Path, state: dict) -> None:
    atomic_write_json(state_path(output), state)


def is_finished(plan: Plan, state: dict, name: str) -> bool:
    """Finished earlier with exactly this run's settings, and its files are there."""
    record = (state.get("runs") or {}).get(name) or {}
    return (record.get("status") == "ok"
            and record.get("fingerprint") == plan.run_fingerprint(name)
            and (plan.output / name / "metrics.json").is_file())
