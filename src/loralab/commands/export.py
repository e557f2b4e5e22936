"""`loralab export`: a fine-tuned model as one GGUF file, read back and compared."""

from __future__ import annotations

import click


@click.command("export")
@click.option("--adapter", "adapter_dir", default=None,
              help="Adapter dir to merge and export (loralab or peft format).")
@click.option("--base", default=None,
              help="Base model for --adapter (default: the adapter's base_model_name_or_path).")
@click.option("--model", "model_dir", default=None,
              help="A fully fine-tuned model dir to export instead of an adapter.")
@click.option("--format", "fmt", type=click.Choice(["gguf"]), default="gguf", show_default=True,
              help="Output format.")
@click.option("--quant", default="q8_0", show_default=True,
              help="f32, f16, bf16, q8_0, q6_k, q5_k_m, q5_k_s, q5_1, q5_0, q4_k_m, q4_k_s, "
              "q4_1, q4_0 (K-quants mixed per tensor as llama-quantize does).")
@click.option("--output", required=True, help="The .gguf file to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def cmd(adapter_dir, base, model_dir, fmt, quant, output, overwrite):
    """Merge (as `loralab merge` does), write GGUF, read it back and compare with the
    merged model; writes FILE.json (the figures) and an Ollama Modelfile beside it."""
    from loralab.export import export_gguf

    export_gguf(output, quant, adapter_dir=adapter_dir, base=base, model_dir=model_dir,
                overwrite=overwrite, echo=click.echo)
