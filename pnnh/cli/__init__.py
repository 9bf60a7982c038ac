"""The ``pnnh`` command line: the click group and one module per command group.

=================  ==========================================================
module             commands
=================  ==========================================================
``models.py``      ``pnnh models``
``train.py``       ``pnnh train``, ``pnnh compare``
``diagnose.py``    ``pnnh diagnose``
``bench.py``       ``pnnh bench``, ``pnnh export``
``study.py``       ``pnnh study``
``ablate.py``      ``pnnh ablate``
``options.py``     the ``--launcher`` options of ``study`` and ``ablate``
=================  ==========================================================

Every command turns its flags into the same dataclass configs the Python API takes, so
``pnnh train`` and ``pnnh.train.train(TrainConfig(...))`` do the same thing. User errors
(:class:`pnnh.errors.PnnhError`) print one ``error:`` line and exit non-zero, no traceback.
Modules that only a command's work needs (analysis, reports, benchmarks, the experiment runner)
are imported inside that command, so ``pnnh --help`` and the other commands do not load them.
"""

from __future__ import annotations

import sys

import click

from ..errors import PnnhError
from ..train import distributed
from ..version import __version__
from . import ablate, bench, diagnose, models, study, train

__all__ = ["cli", "main", "run"]

CONTEXT = dict(help_option_names=["-h", "--help"], max_content_width=100)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="pnnh")
def cli() -> None:
    """pnnh: deep plain (shortcut-free) nets, residual nets, and the PNNH paradigm."""


for _command in (models.models_cmd, train.train_cmd, train.compare_cmd, diagnose.diagnose_cmd, bench.bench_cmd,
                 bench.export_cmd, study.study_cmd, ablate.ablate_cmd):
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI, turning user errors into one line and an exit code."""
    try:
        cli.main(args=argv, prog_name="pnnh", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted; continue a training run with --resume", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except PnnhError as e:
        if not getattr(e, "quiet", False):
            click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted; continue a training run with --resume", err=True)
        sys.exit(130)
    except OSError as e:  # the environment failed us (disk full, permissions): say what, without a traceback
        where = f": {e.filename}" if e.filename else ""
        click.echo(f"error: {e.strerror or e}{where}", err=True)
        sys.exit(1)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)



def run() -> None:
    """The ``pnnh`` command and ``python -m pnnh``: :func:`main`, then the process exit.

    A process that joined a process group (a torchrun worker) leaves through
    :func:`pnnh.train.distributed.exit_worker`, which skips the interpreter's teardown of it.
    """
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    code = code or 0
    if distributed.joined():
        distributed.exit_worker(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
