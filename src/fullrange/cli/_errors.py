"""How the commands fail: one line on stderr, never a stack trace (unless asked for), one exit status per kind.

- :data:`BAD_INPUT` (2): an option, file or folder the user gave is wrong; the line names it as the command line
  spells it (:func:`fail_on` turns the library's config names into flags).
- :data:`FAILED` (1): anything else a command lets through (:class:`OneLineErrors`).
- :data:`INTERRUPTED` (130): training stopped by a signal, with a checkpoint to resume; any other command stopped by
  SIGINT, SIGTERM or SIGHUP ends with 128 + the signal's number, its temporary files removed on the way out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
import warnings
from typing import NoReturn

import click
import typer
from typer.core import TyperGroup

from ..config import ConfigError

DEBUG_ENV = "FULLRANGE_DEBUG"
BAD_INPUT, FAILED, INTERRUPTED = 2, 1, 130


class Stopped(BaseException):
    """A signal asked the command to stop. Raised from the signal handler, it unwinds the command like any exception,
    so atomic writers remove their temporary files (a BaseException: no library's ``except Exception`` eats it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT, SIGTERM and SIGHUP raise :class:`Stopped` in the block (main thread only); the handlers before are
    restored after it. The training loop sets its own for its steps (a checkpoint first)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def stop(signum, frame):
        raise Stopped(signum)

    for sig in signals:
        signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class OneLineErrors(TyperGroup):
    """Any exception a command lets through becomes one line on stderr naming the command (exit status
    :data:`FAILED`); with ``--debug`` or ``FULLRANGE_DEBUG=1`` the stack trace is shown instead. A stopping signal
    (:class:`Stopped`) is one line too."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Arguments that are not UTF-8 text (the shell hands Python undecodable bytes as surrogates) are refused in
        one line, before any option reads them."""
        for arg in args:
            try:
                arg.encode("utf-8")
            except UnicodeEncodeError as err:
                byte = ord(arg[err.start]) - 0xDC00 if 0xDC80 <= ord(arg[err.start]) <= 0xDCFF else ord(arg[err.start])
                shown = arg.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
                fail(f"the argument '{shown}' is not UTF-8 text (byte 0x{byte:02x} at offset {err.start})")
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            with stop_on_signals():
                return super().invoke(ctx)
        except Stopped as stopped:
            command = ctx.invoked_subcommand or ctx.info_name
            typer.echo(f"error: fullrange {command}: stopped by {stopped}; no partial file was left", err=True)
            raise typer.Exit(128 + stopped.signum) from None
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as err:
            if ctx.params.get("debug") or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            command = ctx.invoked_subcommand or ctx.info_name
            detail = (str(err).strip().splitlines() or [""])[0][:400]
            hint = ""
            if isinstance(err, MemoryError) or "out of memory" in detail or "allocate memory" in detail:
                hint = "; out of memory: lower --resolution, --batch-size or --num-images"
            typer.echo(
                f"error: fullrange {command}: {type(err).__name__}: {detail}{hint} "
                f"(--debug or {DEBUG_ENV}=1 shows the stack trace)",
                err=True,
            )
            raise typer.Exit(FAILED) from None


def fail(message: str) -> NoReturn:
    """One line on stderr, exit status :data:`BAD_INPUT`."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(BAD_INPUT)


def fail_on(err: Exception, flags: dict[str, str]) -> NoReturn:
    """``err`` on one line, the config fields it names spelled as this command's ``flags`` (field → flag)."""
    text = str(err)
    if isinstance(err, OSError) and err.filename is not None:  # not "[Errno 28] ...: '/a/b'"
        text = f"{err.filename}: {err.strerror}"
    if isinstance(err, ConfigError) and err.field in flags:
        text = f"{flags[err.field]} {err.message}"
    # Fields the library names in backticks: their flag, or --field-name.
    text = re.sub(r"`([\w.]+)`", lambda m: flags.get(m.group(1)) or "--" + m.group(1).replace("_", "-"), text)
    for name in sorted((f for f in flags if "." in f), key=len, reverse=True):
        text = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w.])", flags[name], text)
    if isinstance(err, ConfigError) and err.message == "is required":
        text += " (on the command line or in --config)"
    fail(text.splitlines()[0] if text else type(err).__name__)


def refuse_overwrite(out, inputs: dict) -> None:
    """Stop before ``--out`` would replace one of the command's ``inputs`` (flag → path), or a file inside one."""
    from ..files import overwrites

    for flag, given in inputs.items():
        if given is not None and overwrites(out, given):
            fail(f"--out {out}: would overwrite {flag} {given}; write it elsewhere")


@contextlib.contextmanager
def library_errors(flags: dict[str, str]):
    """The block's bad input (``ValueError``, ``OSError``; ``ConfigError`` and ``DataError`` are ValueErrors) as one
    line through :func:`fail_on`."""
    try:
        yield
    except (ValueError, OSError) as err:
        fail_on(err, flags)


@contextlib.contextmanager
def warnings_as_lines():
    """Library warnings (a leak at zero SNR, leading steps at zero SNR) as one ``warning:`` line each, and its
    notes (what ``fullrange.sample`` picked) as one ``note:`` line each."""
    notes: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: notes.append(record.getMessage())
    logger = logging.getLogger("fullrange")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
            for message in dict.fromkeys(notes):
                typer.echo(f"note: {message}", err=True)
            for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)):
                typer.echo(f"warning: {message}", err=True)
