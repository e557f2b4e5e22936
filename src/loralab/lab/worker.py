"""Jobs the lab runs in a separate process, one model at a time, so that no
model stays in the comparing process's memory.

    python -m loralab.lab.worker JOB.json

A job file: ``{"kind": "generate", "prompts": [...], "max_new_tokens": N,
"models": [{"name", "model", "method", "run_dir", "config", "out"}, ...]}``.
Each model's answers are written to its ``out`` file as soon as they exist, so
an interrupted job keeps what it finished.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

from loralab.io import atomic_write_json


def run_generate(job: dict) -> None:
    from loralab.lab.generations import generate, load_job_model

    for entry in job["models"]:
        model, tok = load_job_model(entry)
        answers = generate(model, tok, job["prompts"], job["max_new_tokens"])
        atomic_write_json(entry["out"], {"key": entry["key"], "answers": answers})
        del model
        gc.collect()


def main(argv: list[str]) -> int:
    from loralab.lab.runner import die_with_parent

    die_with_parent()  # a killed compare takes its generation job with it
    job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    if job["kind"] == "generate":
        run_generate(job)
        return 0
    print(f"unknown job kind {job['kind']!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    from loralab.errors import LoralabError

    try:
        sys.exit(main(sys.argv[1:]))
    except LoralabError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
