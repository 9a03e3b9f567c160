"""Exceptions raised by the BPS core library.

Every message names what is wrong and how to fix it; the ComfyUI nodes show them to users as-is.
"""


class BPSError(Exception):
    """Base class of every error the BPS library raises on purpose."""


class AdapterError(BPSError, ValueError):
    """An adapter file cannot be used: unreadable, corrupt, incomplete, or for another base model."""


class HintError(BPSError, ValueError):
    """A condition image (hint) does not fit the adapter or the latent: channels, size or batch."""


class ScheduleError(BPSError, ValueError):
    """An omega schedule setting cannot be understood; the message quotes the offending text."""


class ConditionError(BPSError, ValueError):
    """A condition preprocessor cannot run: unknown kind, bad parameter, or not an image array."""
