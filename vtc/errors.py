"""Exception types raised by vtc.

Every error names the problem and the fix in one sentence a user can act on. Bad settings raise the
built-in ``ValueError``; the types below cover what ``ValueError`` cannot say precisely.
"""

from __future__ import annotations


class VTCError(Exception):
    """Base class of every vtc-specific exception."""


class UnknownMethodError(VTCError, LookupError):
    """A method or preset name that is not registered."""


class UnsupportedModelError(VTCError, TypeError):
    """A model whose family has no adapter."""


class MissingCapabilityError(VTCError, TypeError):
    """A method needs a capability that the model family's adapter does not provide."""


class MethodConflictError(VTCError, ValueError):
    """Two methods that cannot run together in one model (for example two owners of generation)."""


class UnsupportedTransformersError(VTCError, RuntimeError):
    """The installed transformers moved an internal vtc relies on (see ``vtc.surface``)."""


class VideoError(VTCError, ValueError):
    """A video that cannot be read, or not sampled as asked (missing, corrupt, empty, or too short)."""
