"""SQL storage of lineage: models, engine/session, migrations."""

from skillbank.db.engine import Database
from skillbank.db.models import Base, Eval, Keyframe, Meta, Ref, RefLog, Revocation, Skill, TaskVector, Version

__all__ = ["Base", "Database", "Eval", "Keyframe", "Meta", "Ref", "RefLog", "Revocation", "Skill", "TaskVector", "Version"]
