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
    from loralab.models import quiet_transformers

    if Path(output).exists() and not overwrite:
        raise LoralabError(f"output '{output}' already exists.",
                           hint="Fix: choose another --output or pass --overwrite.")
    preflight(adapter_dir, Path(output), base)
    with quiet_transformers():  # no "Writing model shards" bar for a one-file save
        info = merge_adapter(adapter_dir, output, base)
    how = " (into the dequantized NF4 base)" if info["quantized"] else ""
    click.echo(f"merged {info['adapter_dir']} into {info['base']}{how} -> {info['output']}")
    click.echo(f"check: max |logit(merged) - logit(adapter)| = {info['max_abs_diff']:.2e} "
               f"on {info['check_inputs']} inputs")


TOKENIZER = 16 << 20  # tokenizer and config files next to the weights


def preflight(adapter_dir, output, base: str | None) -> None:
    """Before the base loads: the output can be written and its disk holds the
    merged model (every base weight in fp32, as loaded for the merge); removes
    what killed merges left next to it (a large model's: gigabytes)."""
    from loralab.io import check_free_space, check_writable, existing_parent, remove_stale_temps
    from loralab.lora.adapters import adapter_base, adapter_task, read_adapter_config

    check_writable(output)
    remove_stale_temps(existing_parent(output.parent), depth=0)
    config = read_adapter_config(adapter_dir)
    base = adapter_base(config, base)
    try:
        from loralab.estimate.spec import load_spec

        total = sum(p.numel() for p in load_spec(base, adapter_task(config) or "sft")
                    .model.parameters())
    except Exception:  # noqa: BLE001  (the loader reports a base it cannot find)
        return
    # under --overwrite the old model goes only once the new one is in place
    check_free_space(output, 4 * total + TOKENIZER, "the merged model's weights")
