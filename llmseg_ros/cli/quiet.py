"""What the ``llmseg`` commands print: their own output, not their dependencies' chatter.

Loading the models makes ``transformers`` draw a "Loading weights" progress bar per model
(and "Writing model shards" while the tiny profile is built), and dependencies emit
warnings and log records meant for their own developers (deprecations, optional kernels
that are absent, retry notices). Unless ``--verbose`` is given, :func:`dependency_output`
hides them for the duration of a command:

- ``transformers``' own progress bars are off; download progress bars (``huggingface_hub``)
  stay on, since a multi-gigabyte download with no progress looks hung;
- Python warnings raised outside ``llmseg_ros`` are ignored;
- log records from outside ``llmseg_ros`` are shown only from level ERROR up.

Everything is restored when the command returns, so embedding ``llmseg_ros.cli.main`` in
another program leaves its settings as they were.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

OWN_PACKAGE = "llmseg_ros"


def _own_or_error(record: logging.LogRecord) -> bool:
    return record.name.split(".")[0] == OWN_PACKAGE or record.levelno >= logging.ERROR


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """Log records from dependencies only from ERROR up (``transformers`` and
    ``huggingface_hub`` have their own handlers and verbosity; the rest go to the root)."""
    import huggingface_hub.utils.logging as hub_logging
    from transformers.utils import logging as transformers_logging

    levels = (transformers_logging.get_verbosity(), hub_logging.get_verbosity())
    transformers_logging.set_verbosity(logging.ERROR)
    hub_logging.set_verbosity(logging.ERROR)
    root = logging.getLogger()
    handler = None
    if not root.handlers:  # an application that configured logging keeps its own setup
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler.addFilter(_own_or_error)
        root.addHandler(handler)
    try:
        yield
    finally:
        if handler is not None:
            root.removeHandler(handler)
        transformers_logging.set_verbosity(levels[0])
        hub_logging.set_verbosity(levels[1])


@contextlib.contextmanager
def _no_loading_bars() -> Iterator[None]:
    """``transformers``' progress bars off, ``huggingface_hub``'s download bars as they were."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as transformers_logging

    had_bars = transformers_logging.is_progress_bar_enabled()
    hub_bars_off = hub_utils.are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # also turns the hub's bars off ...
    if not hub_bars_off:
        hub_utils.enable_progress_bars()  # ... so turn those back on
    try:
        yield
    finally:
        if had_bars:
            transformers_logging.enable_progress_bar()
        if hub_bars_off:
            hub_utils.disable_progress_bars()


@contextlib.contextmanager
def dependency_output(verbose: bool) -> Iterator[None]:
    """Hide the dependencies' progress bars, warnings and log records unless ``verbose``."""
    if verbose:
        yield
        return
    with warnings.catch_warnings(), _quiet_logging(), _no_loading_bars():
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=rf"{OWN_PACKAGE}(\.|$)")
        yield
