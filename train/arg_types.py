"""argparse ``type=`` converters shared by the trainer's and the evaluation's command lines."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer of 1 or more."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An integer of 0 or more."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def resolution(text: str) -> int:
    """A training or evaluation side in pixels: a multiple of 64."""
    value = int(text)
    if value < 64 or value % 64:
        raise argparse.ArgumentTypeError(f"must be a multiple of 64 (64, 128, ..., 512, 768), got {text}")
    return value
