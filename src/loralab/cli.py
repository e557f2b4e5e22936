"""The ``loralab`` command: parse, build a config, call. No logic lives here.

Each subcommand is defined in ``loralab.commands.<name>`` and imported lazily,
so ``loralab --help`` answers without importing torch.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from loralab.errors import INTERRUPTED, LoralabError

# subcommand -> module in loralab.commands that defines a click command `cmd`
COMMANDS = {
    "train": "train",
    "eval": "evaluate",
    "generate": "generate",
    "targets": "targets",
    "merge": "merge",
    "estimate": "estimate",
    "compare": "compare",
    "sweep": "sweep",
    "serve": "serve",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f"loralab.commands.{COMMANDS[name]}")
        return module.cmd


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="loralab")
@click.pass_context
def cli(ctx, debug):
    """Fine-tune Hugging Face models by full fine-tuning, LoRA and QLoRA,
    and measure what each costs and buys."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    if debug:
        os.environ["LORALAB_DEBUG"] = "1"


def main(argv=None):
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="loralab", standalone_mode=False)
    except LoralabError as err:
        if debug:
            raise
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(INTERRUPTED)
    except KeyboardInterrupt:
        if debug:
            raise
        click.echo("interrupted", err=True)
        sys.exit(INTERRUPTED)
    except click.ClickException as err:
        err.show()
        sys.exit(2)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
