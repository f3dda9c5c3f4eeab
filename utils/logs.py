"""Logging set-up for the command-line entry points (never run at import time)."""

from __future__ import annotations

import logging

LOGGER_NAME = "mobile_yolo"


def set_logging(verbose: bool = True, rank: int = -1) -> logging.Logger:
    """Plain message-only logging on stdout; quieter on non-zero DDP ranks."""
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if verbose and rank in (-1, 0) else logging.WARNING)
    return logger
