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
"""
import os
import sys
from contextlib import contextmanager
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


def check_out_dir(option: str, path: Optional[str]) -> None:
    """``UsageError`` if ``path`` exists and is not a folder (an output folder to create)."""
    if path is not None and os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f'{option} {path}: exists and is not a folder')


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
