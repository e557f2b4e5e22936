"""Export end to end: check the request, merge, write to a temp file, read it
back and compare, then rename into place beside its report and Modelfile.

Everything a user can get wrong (architecture, quant type, the output's
directory, disk space, an adapter that does not fit its base) is refused
before the file is written; the GGUF is written as a hidden temp file in the
output's directory and only renamed to its name once it has been read back.
"""

from __future__ import annotations

import contextlib
import os
import time
from importlib.metadata import version
from pathlib import Path

from loralab.errors import LoralabError


def check_output(output, overwrite: bool) -> Path:
    path = Path(output).expanduser()
    if not path.parent.is_dir():
        raise LoralabError(f"the directory of --output '{output}' does not exist.",
                           hint=f"Fix: create {path.parent} first, or pick another --output.")
    if path.is_dir():
        raise LoralabError(f"--output '{output}' is a directory.",
                           hint="Fix: give a file name such as model-q8_0.gguf.")
    if path.exists() and not overwrite:
        raise LoralabError(f"output '{output}' already exists.",
                           hint="Fix: choose another --output or pass --overwrite.")
    return path


def _check_arch(name: str) -> None:
    from loralab.export.arch import arch_for
    from loralab.models import load_config

    arch_for(load_config(name))


def load_merged(adapter_dir=None, base=None, model_dir=None):
    """(merged causal LM, tokenizer, source info), merged as `loralab merge` does."""
    from loralab.models import load_model

    if model_dir is not None:
        _check_arch(model_dir)
        model, tok = load_model(model_dir, "sft")
        return model.eval(), tok, {"model": str(model_dir)}
    from loralab.lora.adapters import adapter_base, adapter_task, read_adapter_config
    from loralab.merge import merged_model

    config = read_adapter_config(adapter_dir)
    base_name = adapter_base(config, base)
    if base_name:
        _check_arch(base_name)
    if adapter_task(config) == "classify":
        raise LoralabError(f"adapter '{adapter_dir}' is a classification adapter; GGUF holds "
                           "causal language models.",
                           hint="Fix: export an sft adapter, or use `loralab merge` for this one.")
    merged, tok, info = merged_model(adapter_dir, base)
    info["merge_max_abs_diff"] = info.pop("max_abs_diff")
    return merged, tok, info


def export_gguf(output, quant: str = "q8_0", *, adapter_dir=None, base=None, model_dir=None,
                overwrite: bool = False, echo=print) -> dict:
    """Export and verify; returns the report also written to ``output + '.json'``."""
    from loralab.export.gguf import build_writer, check_disk, check_quant

    if (adapter_dir is None) == (model_dir is None):
        raise LoralabError("give exactly one of --adapter and --model.",
                           hint="Fix: --adapter DIR (with --base if needed) or --model DIR.")
    quant, path = check_quant(quant), check_output(output, overwrite)
    t0 = time.perf_counter()
    model, tok, source = load_merged(adapter_dir, base, model_dir)
    if "merge_max_abs_diff" in source:
        echo(f"merged {source['adapter_dir']} into {source['base']}"
             f"{' (dequantized NF4 base)' if source.get('quantized') else ''}: "
             f"max |logit(merged) - logit(adapter)| = {source['merge_max_abs_diff']:.2e}")
    writer, plan, estimate, vocab = build_writer(model, tok, quant, path.stem)
    check_disk(path, estimate)
    report = _write_verified(writer, plan, model, tok, quant, path, estimate, echo)
    report.update(source=source, tokenizer=vocab, seconds_total=time.perf_counter() - t0)
    _finish(path, report, tok, echo)
    return report


def _write_verified(writer, plan, model, tok, quant, path: Path, estimate: int, echo) -> dict:
    from loralab.export.gguf import LOSSLESS, type_counts, write_gguf
    from loralab.export.verify import verify
    from loralab.io import owned_temp_path, remove_stale_temps

    remove_stale_temps(path.parent, depth=0)  # what a killed export left behind
    tmp = owned_temp_path(path)
    try:
        t0 = time.perf_counter()
        write_gguf(writer, plan, model, tmp)
        written, t1 = tmp.stat().st_size, time.perf_counter()
        echo(f"wrote {path.name}: {quant}, {written / 1e6:.1f} MB (estimated "
             f"{estimate / 1e6:.1f} MB), {len(plan)} tensors in {t1 - t0:.1f} s")
        result = verify(tmp, model, tok, quant)
        _echo_verify(result, echo)
        if not result["passed"] and quant in LOSSLESS:  # a float type must round-trip
            raise LoralabError(f"the written file failed its check ({result['criterion']}); "
                               "nothing was kept.",
                               hint="Fix: none on your side (a conversion bug): report it "
                               "with the figures above.")
        if not result["passed"]:
            echo(f"warning: {quant} missed its bar ({result['criterion']}); the file is kept "
                 "with the figures above: compare them with --quant f16 before using it")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return {"output": str(path), "format": "gguf", "quant": quant, "bytes": written,
            "estimated_bytes": estimate, "tensor_types": type_counts(plan),
            "seconds_write": t1 - t0, "seconds_verify": time.perf_counter() - t1,
            "verify": result, "gguf_version": version("gguf"),
            "loralab_version": version("loralab"),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _echo_verify(r: dict, echo) -> None:
    echo(f"read back (transformers GGUF loader): max |logit diff| {r['max_abs_logit_diff']:.3g}"
         f" (logits up to {r['logit_scale']:.3g}), top-1 agreement "
         f"{100 * r['top1_agreement']:.1f}%, greedy continuations equal "
         f"{r['greedy_prompts_equal']}")
    echo(f"perplexity on general text ({r['ppl_tokens']} tokens): merged {r['ppl_merged']:.3f}"
         f" -> gguf {r['ppl_gguf']:.3f} ({r['ppl_change_pct']:+.2f}%)")
    for bad in r["metadata_mismatches"]:
        echo(f"metadata mismatch: {bad}")
    echo(f"check: {r['criterion']}: {'passed' if r['passed'] else 'FAILED'}")


def _finish(path: Path, report: dict, tok, echo) -> None:
    from loralab.export.modelfile import modelfile_text, ollama_name
    from loralab.io import atomic_write_json, atomic_write_text

    text, info = modelfile_text(path.name, tok)
    modelfile = path.with_name("Modelfile")
    atomic_write_text(modelfile, text)
    report["modelfile"] = {"path": str(modelfile), **info}
    atomic_write_json(report_path(path), report)
    how = "TEMPLATE from the chat template" if info["template"] else \
        f"no TEMPLATE ({info['template_note']}; Ollama reads the GGUF's chat template)"
    echo(f"Modelfile: {modelfile} ({how}; stop {', '.join(info['stop']) or 'none'})")
    echo(f"  ollama create {ollama_name(path.stem)} -f {modelfile}")
    echo(f"report: {report_path(path)}")


def report_path(path) -> Path:
    return Path(f"{path}.json")
