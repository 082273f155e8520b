"""What every command line of bevtrain does alike: arguments checked before any work, errors a user
can fix printed as one ``error:`` line without a traceback, and the exit codes.

Exit codes (README "Exit codes"):

- 0: done;
- 2 (``EXIT_USAGE``): a flag, preset, checkpoint or folder named on the command line is wrong;
- 65 (``EXIT_DATA``, sysexits' EX_DATAERR): a file, table or calibration of the dataset is bad; the
  message names it (also when a loader worker found it);
- 75: training stopped early by a signal, resumable (``--signal_exit_code``);
- 1: anything else (a bug or a broken environment), with its traceback.

The traceback of a usage or data error is printed with ``--debug``; a training run also writes it to
``<log_dir>/<run>/error.txt``.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, NoReturn, Sequence

from bevtrain.suggest import closest_name

# Standard library only at import: the synthetic-data generator uses this module too, without torch.

EXIT_USAGE = 2
EXIT_DATA = 65
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: free space (or wait) and run again


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def check_argv(argv: Sequence[str]) -> None:
    """What fire would take for its own syntax and act on after the run (or never): a bare ``--``
    (the arguments after it go to fire) and single-dash options."""
    from bevtrain.config import ConfigError

    for arg in argv:
        if arg == "--":
            raise ConfigError("'--' is not an argument of this command: give every flag as --name=value")
        if arg.startswith("-") and not arg.startswith("--") and arg not in ("-h",) and not _is_number(arg):
            raise ConfigError(f"unknown option '{arg}': flags take two dashes, e.g. --{arg.lstrip('-')}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def fire_main(command: Callable[..., Any], argv: Sequence[str] | None = None) -> None:
    """Run ``command`` under fire after ``check_argv``; the entry scripts' one line."""
    import fire

    from bevtrain.config import ConfigError

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        check_argv(argv)
    except ConfigError as e:
        fail(str(e))
    fire.Fire(command, command=argv)


def refuse_positional(args: Iterable[Any], flag_for_path: str = "") -> None:
    """ConfigError for positional arguments (fire would only complain once the run is over)."""
    from bevtrain.config import ConfigError

    args = list(args)
    if not args:
        return
    first = str(args[0])
    looks_like_path = "/" in first or "." in first
    hint = f"; did you mean --{flag_for_path}={first}?" if flag_for_path and looks_like_path else ""
    raise ConfigError(
        f"unexpected argument '{first}'"
        + (f" (and {len(args) - 1} more)" if len(args) > 1 else "")
        + f": flags are --name=value, lists --name=[a,b]{hint}"
    )


# -- errors a user fixes ---------------------------------------------------------------------------------
def data_error_types() -> tuple:
    """The exceptions that name a problem in the user's data (files, tables, calibration)."""
    from bevtrain.data.augment import ImageReadError
    from bevtrain.data.dataset import (
        BadSampleError,
        ClassMatchError,
        RigError,
        SampleReadError,
        TooManyBadSamplesError,
    )
    from bevtrain.data.index import DataLayoutError, DataTableError, MapExpansionError
    from bevtrain.data.points import PointFileError

    return (SampleReadError, BadSampleError, TooManyBadSamplesError, DataLayoutError, DataTableError,
            ImageReadError, PointFileError, MapExpansionError, ClassMatchError, RigError)


def user_message(exc: BaseException) -> str:
    """The exception's own message. One re-raised by a DataLoader in the main process carries the
    worker's whole traceback in its message ("Caught X in DataLoader worker process 0. Original
    Traceback ..."): the message is the last exception of that text."""
    text = str(exc)
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return text
    kind = type(exc)
    for prefix in (f"{kind.__module__}.{kind.__qualname__}: ", f"{kind.__qualname__}: "):
        at = text.rfind("\n" + prefix)
        if at >= 0:
            return text[at + 1 + len(prefix):].strip()
    return text.strip().splitlines()[-1]


def record_traceback(exc: BaseException, folder: Path) -> Path | None:
    """Write the traceback of ``exc`` to ``folder/error.txt`` (when the folder exists) and remember
    where on the exception; returns the file."""
    if not folder.is_dir():
        return None
    path = folder / "error.txt"
    try:
        path.write_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    except OSError:
        return None
    exc.bevtrain_traceback_file = str(path)
    return path


def run_command(
    command: Callable[[], Any], *, debug: bool = False, usage_errors: tuple = (), prog: str = ""
) -> Any:
    """``command()`` with the errors a user fixes printed as one ``error:`` line: ConfigError and
    ``usage_errors`` exit 2, data errors (``data_error_types``) exit 65, a full disk exit 75. With
    ``debug`` the traceback
    comes first; without, a data error says where its traceback is."""
    from bevtrain.config import ConfigError

    data_errors = data_error_types()
    try:
        return command()
    except (ConfigError, *usage_errors) as e:
        if debug:
            traceback.print_exc()
        fail(f"{prog + ': ' if prog else ''}{e}", EXIT_USAGE)
    except data_errors as e:
        if debug:
            traceback.print_exc()
        message = user_message(e)
        saved = getattr(e, "bevtrain_traceback_file", None)
        if not debug:
            where = f"in {saved}, or " if saved else ""
            message += f"\n(the traceback: {where}run again with --debug)"
        fail(message, EXIT_DATA)
    except Exception as e:
        from bevtrain.disk import DiskFullError, disk_full_message, is_disk_full

        if not is_disk_full(e):
            raise
        if debug:
            traceback.print_exc()
        if not isinstance(e, DiskFullError):  # a write of our own that no atomic writer wrapped
            e = DiskFullError(disk_full_message(getattr(e, "filename", None) or "a file",
                                                Path(getattr(e, "filename", None) or ".").parent))
        fail(f"{prog + ': ' if prog else ''}{e}", EXIT_TEMPFAIL)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for bevtrain's tools: no abbreviated flags, and a mistake is one ``error:`` line (with
    the closest flag for an unknown one) and exit 2, as in train_nuscenes.py."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments: "):
            unknown = message.split(": ", 1)[1].split()
            first = unknown[0]
            known = [a.option_strings[0][2:] for a in self._actions
                     if a.option_strings and a.option_strings[0].startswith("--")]
            if first.startswith("--"):
                name = first[2:].split("=", 1)[0]
                close = closest_name(name, known)
                hint = f"; did you mean '--{close}'?" if close else ""
                message = f"unknown flag '--{name}'{hint} (see {self.prog} --help)"
            else:
                message = f"unexpected argument '{first}': flags are --name=value (see {self.prog} --help)"
        fail(message)
