"""skillbank: grow one robot policy skill by skill, with every merge on record."""

__version__ = "0.1.0"

from skillbank.errors import SkillbankError  # noqa: E402

__all__ = ["SkillbankError", "__version__"]
