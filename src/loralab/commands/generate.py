"""``loralab generate``: text from a model (and an adapter) for one prompt.

The offline reference for ``loralab serve``: both run the same decoding loop
(``loralab.generation``), so a greedy answer here equals the server's.
"""

from __future__ import annotations

import json

import click

from loralab.commands.options import POSITIVE_INT, SEED, TEMPERATURE, TOP_P


@click.command("generate")
@click.option("--model", required=True, help="Base model: alias, local dir or hub id.")
@click.option("--adapter", type=click.Path(), default=None,
              help="Adapter dir (PEFT format) or a run dir holding adapter/.")
@click.option("--prompt", required=True, help="Prompt text (used as-is unless --chat).")
@click.option("--chat", is_flag=True, help="Treat the prompt as a user message in the chat format.")
@click.option("--max-tokens", type=POSITIVE_INT, default=64, show_default=True)
@click.option("--temperature", type=TEMPERATURE, default=0.0, show_default=True,
              help="0 is greedy decoding.")
@click.option("--top-p", type=TOP_P, default=1.0, show_default=True)
@click.option("--seed", type=SEED, default=None, help="Seed for sampled decoding.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON object (text, finish_reason, token counts).")
def cmd(model, adapter, prompt, chat, max_tokens, temperature, top_p, seed, stop, as_json):
    """Generate text for PROMPT; prints the completion only (streamed)."""
    from loralab.generation import SamplingParams, complete, load_for_generation

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            stop=tuple(stop), seed=seed)
    lm, tokenizer = load_for_generation(model, adapter)
    on_text = None if as_json else (lambda delta: click.echo(delta, nl=False))
    result = complete(lm, tokenizer, prompt, params, chat=chat, on_text=on_text)
    if as_json:
        click.echo(json.dumps({"text": result.text, "finish_reason": result.finish_reason,
                               "prompt_tokens": len(result.prompt_ids),
                               "completion_tokens": len(result.token_ids)}))
    else:
        click.echo()
