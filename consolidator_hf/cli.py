"""What every command line in ``scripts/`` shares: a help formatter that shows the defaults, and
:func:`run_cli`, which prints the library's own errors as one line (exit 2) instead of a
traceback.

Kept free of torch/transformers imports: a script's argument checks should not wait for them.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Any, Callable, List, Optional, Tuple

#: Set to 1 for full tracebacks from any script (the same as its ``--debug`` flag).
DEBUG_ENV = "CONSOLIDATOR_DEBUG"

# What a user can fix from the message: bad values, missing or unreadable files, a missing
# optional dependency. Anything else (a bug) keeps its traceback.
USER_ERRORS = (ValueError, OSError, ImportError)


def _shows_default(action: argparse.Action) -> bool:
    return not (action.default is None or action.default is False
                or action.default == argparse.SUPPRESS)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks and appends ``(default: ...)`` to every option that
    has one and does not already state it."""

    def add_argument(self, action: argparse.Action) -> None:
        if action.help is None and _shows_default(action):  # argparse skips help-less options
            action.help = "(default: %(default)s)"
        super().add_argument(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or not _shows_default(action):  # `is False`: a 0 is still shown
            return text
        return super()._get_help_string(action) or text


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", default=False,
                        help=f"show full tracebacks (also: {DEBUG_ENV}=1)")


def debug_requested(argv: Optional[List[str]] = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(error: BaseException) -> str:
    """An exception's message on one line (multi-line messages joined with ' ')."""
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return text or type(error).__name__


def run_cli(main: Callable[[List[str]], Any], argv: Optional[List[str]] = None,
            prog: Optional[str] = None, extra_errors: Tuple[type, ...] = ()) -> int:
    """Run ``main(argv)``; a :data:`USER_ERRORS` exception becomes ``prog: error: <message>``
    on stderr and exit status 2 (argparse's convention), with the traceback only when
    ``--debug`` or ``CONSOLIDATOR_DEBUG=1`` is given; ``extra_errors`` are treated the same
    (e.g. ``HubError``). Returns ``main``'s int result (else 0)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or os.path.basename(sys.argv[0] or "script")
    try:
        result = main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS + tuple(extra_errors) as e:
        if debug_requested(argv):
            traceback.print_exc()
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    return result if isinstance(result, int) else 0
