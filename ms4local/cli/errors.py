"""One table from exception types to exit codes; one line on stderr for the user.

Library code raises typed errors; only here do they become messages. Set MS4LOCAL_DEBUG=1 to
see the traceback as well.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from quantize.errors import QuantizeError, UnsupportedTypeError
from quantize.units import SizeError

from ..errors import ImageError, Ms4localError, OptionsError, VocabMismatchError

F = TypeVar("F", bound=Callable[..., Any])

# (exception type, exit code); the first match wins. 2 is for usage errors, as in click.
EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (UnsupportedTypeError, 2),
    (SizeError, 2),
    (OptionsError, 2),
    (VocabMismatchError, 2),  # `eval --reference` with a file of another model: a wrong argument
    (ImageError, 2),  # --image with a file that is no usable image: a wrong argument
    (QuantizeError, 1),
    (Ms4localError, 1),
]


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `error: message` on one line and return the Exit to raise."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return typer.Exit(code)


def handle_errors(func: F) -> F:
    """Turn the library's typed errors into one line and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130) from None
        except tuple(t for t, _ in EXIT_CODES) as e:
            if os.environ.get("MS4LOCAL_DEBUG"):
                raise
            code = next(c for t, c in EXIT_CODES if isinstance(e, t))
            raise fail(str(e), code) from None

    return wrapper  # type: ignore[return-value]
