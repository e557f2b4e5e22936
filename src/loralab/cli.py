"""The ``loralab`` command: parse, build a config, call. No logic lives here.

Each subcommand is defined in ``loralab.commands.<name>`` and imported lazily,
so ``loralab --help`` answers without importing torch.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from loralab.errors import INTERRUPTED, describe

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
    "export": "export",
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
    """Run the CLI; every failure ends as one line on stderr and an exit code
    (``--debug``: the traceback instead)."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    if os.environ.get("LORALAB_PARENT_PID"):  # a lab run's child: it dies with the lab
        from loralab.lab.runner import die_with_parent

        die_with_parent()
    try:
        cli.main(args=argv, prog_name="loralab", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt) as err:
        if debug:
            raise
        click.echo("interrupted", err=True)
        cause = err.__cause__ or err  # click turns KeyboardInterrupt into Abort
        sys.exit(getattr(cause, "exit_code", INTERRUPTED))  # SIGTERM: 143
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except click.ClickException as err:
        click.echo(f"error: {_click_line(err)}", err=True)
        sys.exit(err.exit_code)
    except SystemExit:
        raise
    except Exception as err:
        if debug:
            raise
        message, code = describe(err)
        # under a launcher rank 0 reports for all ranks; another rank's own bug
        # is still shown where it happened, as that rank's line
        rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") != "1" else "0"
        click.echo(f"{'error' if rank == '0' else f'rank {rank}'}: {message}", err=True)
        sys.exit(code)


def _click_line(err: click.ClickException) -> str:
    """A usage error in one line (click prints usage, a hint and the error)."""
    text = " ".join(err.format_message().split())
    ctx = getattr(err, "ctx", None)
    if isinstance(err, click.UsageError) and ctx is not None:
        text += f" (see `{ctx.command_path} --help`)"
    return text
