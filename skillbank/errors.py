"""Errors a user can cause. The CLI prints their message as one line and exits 1."""

import reprlib

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 3, 6, 4


def show(value) -> str:
    """repr() cut short: a hostile name or value must not turn one error line into a megabyte."""
    return _REPR.repr(value)


class SkillbankError(Exception):
    """Base class: anything raised as this is the user's to fix, never a bug."""


class CheckpointError(SkillbankError):
    """A checkpoint file or directory cannot be read safely."""


class RefError(SkillbankError):
    """A ref does not name a version, or cannot be created or moved."""


class BranchMoved(RefError):
    """Compare-and-swap on a branch lost to another writer."""


class ValidationError(SkillbankError):
    """A finetuned checkpoint or an argument does not fit the parent version."""


class IntegrityError(SkillbankError):
    """Stored bytes do not match their digest, or an object is missing or unreadable.

    `digest` names the object and `kind` what is wrong with it ("corrupt", "truncated",
    "missing") where known; `versions` lists the versions it breaks once the Bank has said so in
    the message (an error explained once is not explained again by an outer call).
    """

    def __init__(self, message: str, *, digest: str | None = None, kind: str | None = None,
                 versions: list[str] | None = None):
        super().__init__(message)
        self.digest = digest
        self.kind = kind
        self.versions = versions


class SchemaError(SkillbankError):
    """The database schema is not the one this skillbank expects."""
