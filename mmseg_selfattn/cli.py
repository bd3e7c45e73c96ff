"""What every tool does with a user's mistake: one line naming the argument or file and
what is allowed, exit code 2 (argparse's convention), no traceback.

A tool's ``main`` raises ``UsageError`` for mistakes in its own arguments, and wraps the
steps that read the user's files (config, class names, data, checkpoints) in
``user_files(...)``, which turns the clear errors those steps raise (missing or unreadable
files, refused config values: ``OSError``, ``ValueError``, mmengine's config errors) into
a ``UsageError`` naming the file. Anything else is a bug and keeps its traceback::

    def main(argv=None) -> int:
        args = parse_args(argv)
        with user_files(f'CONFIG {args.config}'):
            cfg = Config.fromfile(args.config)
        ...

    if __name__ == '__main__':
        sys.exit(run_main(main))

It also holds the argparse types and argument checks several tools share (``key_value``,
``positive_int``, ``number``, ``integer``, ``torch_device``, ``check_pretrained``,
``check_out_file``). This module
is imported by ``clip_loader``: it keeps to the standard library at import time (torch and
open_clip are imported by the functions that need them). The checks of configs, models
and runners are in ``tool_checks``.
"""
import argparse
import logging
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple, Type

USAGE_EXIT_CODE = 2


class UsageError(Exception):
    """A mistake in a tool's arguments or in the user's files (one line, exit 2)."""


class UserSetupError(Exception):
    """Mixed into errors of the package that a user's setting causes and the user fixes,
    whatever their base type (e.g. ``clip_loader.WeightsUnavailableError``, a
    ``RuntimeError``: weights of a tag that cannot be downloaded here)."""


# what the package and mmengine raise for a bad file or value (never for a bug of ours:
# those are TypeError, AttributeError, IndexError, RuntimeError, ...)
USER_FILE_ERRORS: Tuple[Type[BaseException], ...] = (OSError, ValueError, KeyError,
                                                      SyntaxError, UnicodeError,
                                                      UserSetupError)


@contextmanager
def user_files(what: str, errors: Tuple[Type[BaseException], ...] = USER_FILE_ERRORS
               ) -> Iterator[None]:
    """Errors of ``errors`` raised inside become ``UsageError('<what>: <message>')``.

    Args:
        what: the argument or file being read, as the user wrote it (``'CONFIG x.py'``,
            ``'--classes'``); left out of the message when the message already names it.
    """
    try:
        yield
    except UsageError:
        raise
    except errors as error:
        raise UsageError(_one_line(what, error)) from error


def check_exists(option: str, path: Optional[str], kind: str = 'file') -> None:
    """``UsageError`` unless ``path`` is an existing file (``kind='file'``) or folder
    (``kind='folder'``). None is accepted (an option that was not given)."""
    if path is None:
        return
    if not os.path.exists(path):
        raise UsageError(f'{option} {path}: no such {kind}')
    if kind == 'file' and not os.path.isfile(path):
        raise UsageError(f'{option} {path}: not a file')
    if kind == 'folder' and not os.path.isdir(path):
        raise UsageError(f'{option} {path}: not a folder')


def check_out_dir(option: str, path: Optional[str], parents: bool = False) -> None:
    """``UsageError`` if ``path`` exists and is not a folder (an output folder to create);
    with ``parents``, also if the nearest existing folder above it is a file (it could
    not be made)."""
    if path is None:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f'{option} {path}: exists and is not a folder')
    if parents:
        parent = Path(path).parent  # the folder it is made in
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if parent.exists() and not parent.is_dir():
            raise UsageError(f'{option} {path}: {parent} is not a folder')


def check_out_file(option: str, path: Optional[str]) -> None:
    """An output file (e.g. ``--json``): not a folder, and its folder exists (checked
    before the run, which writes it at its end). None is accepted."""
    if path is None:
        return
    if os.path.isdir(path):
        raise UsageError(f'{option} {path}: is a folder; give a file path')
    folder = os.path.dirname(path) or '.'
    if not os.path.isdir(folder):
        raise UsageError(f'{option} {path}: no such folder {folder}')


def check_pretrained(value: Optional[str]) -> None:
    """--pretrained: 'none', a checkpoint file or an open_clip tag (of some arch: the
    model checks that it is one of its arch's when it loads). None is accepted (the
    config's)."""
    if value is None or value.lower() == 'none' or os.path.isfile(value):
        return
    if os.path.exists(value):
        raise UsageError(f'--pretrained {value}: not a file')
    import open_clip
    tags = {tag.lower().replace('-', '_') for _, tag in open_clip.list_pretrained()}
    if value.lower().replace('-', '_') not in tags:
        raise UsageError(f"--pretrained {value}: no such file, and not an open_clip tag; give "
                         "a checkpoint file, a tag such as openai, or 'none' for random weights")


# -- argparse types (``type=`` of an option: a bad value is argparse's one-line error) -------
def key_value(text: str) -> str:
    """One ``--cfg-options`` item (``type=`` of the option): KEY=VALUE, else argparse's
    one-line error (mmengine's DictAction fails on anything else with a traceback)."""
    key, sep, _ = text.partition('=')
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f'{text!r} is not KEY=VALUE, e.g. model.slide_crop=336')
    return text


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f'{text!r} is not a positive integer')
    return value


def number(low: float, high: float = math.inf, low_open: bool = False,
           integer: bool = False) -> Callable[[str], float]:
    """An argparse type: a number (an integer if ``integer``) in [low, high] ((low, high]
    if ``low_open``; no upper bound if ``high`` is inf)."""
    kind = 'an integer' if integer else 'a number'

    def parse(text: str) -> float:
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            value = math.nan
        if not (low < value if low_open else low <= value) or not value <= high:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(
                f'{text!r} is not {kind} in {interval}' if high < math.inf
                else f'{text!r} is not {kind} >{"" if low_open else "="} {low:g}')
        return value
    parse.__name__ = 'integer' if integer else 'number'
    return parse


def integer(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""
    return number(minimum, integer=True)


def torch_device(text: str) -> str:
    """--device: cpu, cuda or cuda:N of a GPU that is there."""
    import torch
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ('cpu', 'cuda'):
        raise argparse.ArgumentTypeError(f'{text!r} is not a device: use cpu, cuda or cuda:N')
    count = torch.cuda.device_count() if device.type == 'cuda' else 0
    if device.type == 'cuda' and not count:
        raise argparse.ArgumentTypeError(f'{text!r}: no CUDA GPU is visible here; use cpu')
    if device.type == 'cuda' and (device.index or 0) >= count:
        raise argparse.ArgumentTypeError(f'{text!r}: this machine has {count} CUDA GPU(s) '
                                         f'(cuda:0 to cuda:{count - 1})')
    return text


def run_main(main: Callable[[], Optional[int]], prog: Optional[str] = None) -> int:
    """Runs ``main()``; a ``UsageError`` prints ``<prog>: error: <message>`` on stderr and
    returns 2. Returns ``main``'s exit code otherwise (None = 0)."""
    prog = prog or os.path.basename(sys.argv[0] or 'tool')
    try:
        code = main()
    except UsageError as error:
        print(f'{prog}: error: {error}', file=sys.stderr, flush=True)
        return USAGE_EXIT_CODE
    return 0 if code is None else code


def _one_line(what: str, error: BaseException) -> str:
    if isinstance(error, KeyError) and error.args:  # str(KeyError) adds quotes
        message = str(error.args[0])
    elif isinstance(error, OSError) and error.filename is not None and error.strerror:
        message = f'{error.filename}: {error.strerror}'
    else:
        message = str(error) or type(error).__name__
    message = ' '.join(message.split())  # one line
    name = what.split(' ', 1)[-1]
    return message if what in message or name in message else f'{what}: {message}'


def exit_now(code: int) -> None:
    """Ends an evaluation tool's process with ``code`` right after flushing its output and
    logs, skipping the interpreter's teardown of torch and the model (measured at 1.5-1.7 s
    after the last line, on CPU and on an H200 host). In a distributed run (a process group
    is up) the normal exit runs, which also ends the group."""
    import torch.distributed as dist  # already imported by the tools that call this
    if dist.is_available() and dist.is_initialized():
        sys.exit(code)
    logging.shutdown()  # flushes and closes the log files (mmengine's handlers included)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing left to keep
            pass
    os._exit(code)
