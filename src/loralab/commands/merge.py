"""`loralab merge`: fold an adapter into its base, write a plain HF model."""

from __future__ import annotations

import click


@click.command("merge")
@click.option("--adapter", "adapter_dir", required=True,
              help="Adapter dir (loralab or peft format).")
@click.option("--base", default=None,
              help="Base model (default: the adapter's base_model_name_or_path).")
@click.option("--output", required=True, help="Where to write the merged model dir.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output dir.")
def cmd(adapter_dir, base, output, overwrite):
    """Merge an adapter into its base model and save a standard HF model dir + tokenizer."""
    from pathlib import Path

    from loralab.errors import LoralabError
    from loralab.merge import merge_adapter

    if Path(output).exists() and not overwrite:
        raise LoralabError(f"output '{output}' already exists.",
                           hint="Fix: choose another --output or pass --overwrite.")
    info = merge_adapter(adapter_dir, output, base)
    how = " (into the dequantized NF4 base)" if info["quantized"] else ""
    click.echo(f"merged {info['adapter_dir']} into {info['base']}{how} -> {info['output']}")
    click.echo(f"check: max |logit(merged) - logit(adapter)| = {info['max_abs_diff']:.2e} "
               f"on {info['check_inputs']} inputs")
