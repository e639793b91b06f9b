"""Logging set-up shared by the command line and the Snakemake scripts.

One line per step, with a prefix that says which job wrote it, so the logs of many
jobs can be read side by side.
"""

from __future__ import annotations

import logging
import os
import sys

LOG_FORMAT = "%(asctime)s %(levelname)-7s {prefix}%(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def setup_logging(
    path: str | os.PathLike | None = None, prefix: str = "", level: int = logging.INFO
) -> logging.Logger:
    """Send the package's log records to ``path`` (or stderr), one line each.

    Python warnings (from torch, h5py, ...) go to the same place.
    """
    handler: logging.Handler
    if path is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        handler = logging.FileHandler(path, mode="w")
    fmt = LOG_FORMAT.format(prefix=f"[{prefix}] " if prefix else "")
    handler.setFormatter(logging.Formatter(fmt, DATE_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    return logging.getLogger("cai")
