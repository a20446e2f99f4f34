"""Errors a user can cause. The CLI prints their message as one line and exits 1."""


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
    """Stored bytes do not match their digest."""


class SchemaError(SkillbankError):
    """The database schema is not the one this skillbank expects."""
