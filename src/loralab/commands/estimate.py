"""``loralab estimate``: will it fit? Memory per method before anything loads."""

from __future__ import annotations

import json

import click

METHOD_CHOICES = ("full", "lora", "qlora", "head", "all")


@click.command("estimate")
@click.option("--model", "model", default=None,
              help="Preset (gpt2, llama-2-7b, minilm, ...), model dir, config.json or hub id.")
@click.option("--method", type=click.Choice(METHOD_CHOICES), default="all", show_default=True)
@click.option("--task", type=click.Choice(["classify", "sft", "lm"]), default=None,
              help="Default: classify for encoders, sft for decoders.")
@click.option("--num-labels", type=int, default=2, show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16-mixed", "bf16", "amp-bf16"]),
              default=None, help="Default: bf16-mixed on cuda, fp32 on cpu. amp-bf16 is "
              "what `loralab train` does on a GPU (fp32 model, bf16 autocast).")
@click.option("--optimizer", type=click.Choice(["adamw", "adamw-8bit", "sgd", "sgd-momentum"]),
              default="adamw", show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--seq-len", type=int, default=None, help="Default: 128 classify, 512 sft/lm.")
@click.option("--micro-batch-tokens", type=int, default=None, metavar="N",
              help="Padded tokens per forward/backward pass, as `loralab train` packs them "
              "(rows per pass = N // seq-len). Default: batch-size x seq-len.")
@click.option("--rank", type=int, default=8, show_default=True)
@click.option("--targets", default="attention", show_default=True,
              help="attention, all-linear, or comma-separated module-name suffixes.")
@click.option("--target-parameters", default=None, metavar="NAMES",
              help="LoRA on MoE experts' 3-D weights too, as `loralab train "
              "--target-parameters`: experts, or e.g. experts.down_proj.")
@click.option("--lora-dropout", type=float, default=0.0, show_default=True)
@click.option("--use-dora", is_flag=True, help="DoRA on the LoRA layers (lora / qlora).")
@click.option("--grad-checkpointing", is_flag=True)
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True)
@click.option("--gpu", "gpu", default=None, metavar="SIZE",
              help="Memory to fit in, e.g. 24GB or 24GiB: says whether it fits and the "
              "largest batch that does.")
@click.option("--no-overhead", is_flag=True, help="Leave out the CUDA context / CPU process.")
@click.option("--explain", is_flag=True,
              help="Show how published tables get 84 / 112 / 168 GB (7B full) and 4-6 GB "
              "(QLoRA); --model defaults to llama-2-7b.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def cmd(model, method, task, num_labels, precision, optimizer, batch_size, seq_len,
        micro_batch_tokens, rank, targets, target_parameters, lora_dropout, use_dora,
        grad_checkpointing, device, gpu,
        no_overhead, explain, as_json):
    """Estimate training memory for full / LoRA / QLoRA / head before loading anything."""
    from loralab.estimate import report as run

    if explain:
        run.explain(model or "llama-2-7b", as_json)
        return
    report = run.build_report(
        model, method, task=task, num_labels=num_labels, precision=precision,
        optimizer=optimizer, batch_size=batch_size, seq_len=seq_len, rank=rank,
        targets=targets, lora_dropout=lora_dropout, grad_checkpointing=grad_checkpointing,
        device=device, gpu=gpu, overhead=not no_overhead,
        micro_batch_tokens=micro_batch_tokens, target_parameters=target_parameters,
        use_dora=use_dora)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        run.print_report(report)
