"""`loralab compare ... --export gguf`: the comparison's best run as GGUF.

"Best" is the headline quality the report ranks by (perplexity for sft): the
finished run with the best value. Its adapter (or full fine-tuned model) is
exported beside the runs, in ``OUTPUT/export/``, and the figures go to
``OUTPUT/export.json``, which the report shows next to the run's own.
"""

from __future__ import annotations

import json
from pathlib import Path

from loralab.errors import LoralabError

EXPORT_JSON = "export.json"


def check_exportable(plan, quant: str) -> str:
    """Refuse --export before training: a classify comparison, an architecture
    or a type GGUF export does not handle. Returns the checked quant name."""
    from loralab.export.gguf import check_quant
    from loralab.export.run import _check_arch

    if plan.task != "sft":
        raise LoralabError(f"--export gguf exports causal language models; this comparison "
                           f"is '{plan.task}'.", hint="Fix: drop --export, or compare --task sft.")
    quant = check_quant(quant)
    _check_arch(plan.shared()["model"])
    return quant


def best_run(rows: list[dict]) -> dict:
    from loralab.lab import results as R

    quality = R.headline_quality(rows)
    scored = [(R.metric_value(r, quality.key), r) for r in R.ok_rows(rows)]
    scored = [(v, r) for v, r in scored if v is not None]
    if not scored:
        raise LoralabError("no finished run to export.",
                           hint="Fix: rerun the comparison; --export needs one finished run.")
    pick = max if quality.higher_is_better else min
    return pick(scored, key=lambda vr: vr[0])[1]


def export_best(output: Path, rows: list[dict], quant: str, echo=print) -> dict:
    """Export the best run of the comparison in ``output``; returns the summary
    also written to ``output/export.json``."""
    from loralab.export import export_gguf
    from loralab.io import atomic_write_json
    from loralab.lab import results as R

    row = best_run(rows)
    run_dir = output / row["run"]
    source = ({"model_dir": run_dir / "model"} if (run_dir / "model").is_dir()
              else {"adapter_dir": run_dir / "adapter"})
    (output / "export").mkdir(exist_ok=True)
    target = output / "export" / f"{row['run']}-{quant}.gguf"
    echo(f"exporting the best run, {row['run']} ({R.headline_quality(rows).label} "
         f"{R.quality_text(row, R.headline_quality(rows))}), to {target}")
    report = export_gguf(target, quant, overwrite=True, echo=echo, **source)
    v = report["verify"]
    summary = {"run": row["run"], "file": str(target), "quant": quant, "bytes": report["bytes"],
               "artifact_bytes": row.get("artifact_bytes"), "ppl_merged": v["ppl_merged"],
               "ppl_gguf": v["ppl_gguf"], "ppl_change_pct": v["ppl_change_pct"],
               "max_abs_logit_diff": v["max_abs_logit_diff"],
               "top1_agreement": v["top1_agreement"],
               "greedy_prompts_equal": v["greedy_prompts_equal"], "passed": v["passed"],
               "criterion": v["criterion"], "modelfile": report["modelfile"]["path"]}
    atomic_write_json(output / EXPORT_JSON, summary)
    return summary


def read_export(output: Path) -> dict | None:
    path = Path(output) / EXPORT_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def rewrite_report(plan, summary: dict) -> None:
    """report.html again, from results.json, with the export beside the runs."""
    from loralab.lab.execute import report_meta
    from loralab.lab.report import write_report

    results = json.loads((plan.output / "results.json").read_text())
    meta = report_meta(plan, results.get("environment") or {}, results.get("generations") or [])
    meta["export"] = summary
    write_report(plan.output / "report.html", results["runs"], meta)
