"""The bank's tables. Versions, skills and task vectors are written once; only refs move."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, BigInteger, Float, ForeignKey, Integer, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Meta(Base):
    """Key/value facts about the bank itself (its id, when it was created)."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Version(Base):
    __tablename__ = "versions"
    # The number shown as vN. Allocated as max+1 inside the writing transaction, so no gaps.
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"), index=True)
    skill_id: Mapped[int | None] = mapped_column(ForeignKey("skills.id", use_alter=True))
    method: Mapped[str] = mapped_column(String(32))  # "base" or a merge method name
    alphas: Mapped[dict | None] = mapped_column(JSON)  # {"*": 0.8} or {"vision": 1.0, ...}
    group_preset: Mapped[str | None] = mapped_column(String(128))
    digest: Mapped[str] = mapped_column(String(32), index=True)  # canonical weights, xxh3-128
    # SHA-256 of the same bytes: what `audit` decides on (xxh3 resists accidents, not forgers).
    # NULL for versions written before migration 0004 until `skillbank db backfill-sha256`.
    sha256: Mapped[str | None] = mapped_column(String(64))
    manifest: Mapped[str] = mapped_column(String(32))  # object: tensor specs + rebuild recipe
    source: Mapped[str | None] = mapped_column(Text)  # where the base came from
    n_params: Mapped[int] = mapped_column(BigInteger)
    n_bytes: Mapped[int] = mapped_column(BigInteger)
    author: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    message: Mapped[str | None] = mapped_column(Text)
    # A branch merge has two parents; `parent_id` is the first (the one `log` follows).
    second_parent_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"))
    # A version replayed by `rebuild --without`: the version whose step it re-applies.
    rebuilt_from_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"))

    parent: Mapped["Version | None"] = relationship(remote_side=[id], foreign_keys=[parent_id])
    skill: Mapped["Skill | None"] = relationship(foreign_keys=[skill_id])

    @property
    def label(self) -> str:
        return f"v{self.id}"


class Skill(Base):
    __tablename__ = "skills"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    parent_version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))
    finetuned_source: Mapped[str | None] = mapped_column(Text)
    finetuned_digest: Mapped[str] = mapped_column(String(32))
    demos_uri: Mapped[str | None] = mapped_column(Text)
    demos_digest: Mapped[str | None] = mapped_column(String(64))
    demos_dvc_hash: Mapped[str | None] = mapped_column(String(64))
    demos_git_rev: Mapped[str | None] = mapped_column(String(64))
    trainer: Mapped[str | None] = mapped_column(String(64))  # "external", "skillbank-bc", ...
    trainer_settings: Mapped[dict | None] = mapped_column(JSON)
    task_vector_id: Mapped[int] = mapped_column(ForeignKey("task_vectors.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    task_vector: Mapped["TaskVector"] = relationship()


class TaskVector(Base):
    __tablename__ = "task_vectors"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    parent_version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))
    codec: Mapped[str] = mapped_column(String(64))
    codec_params: Mapped[dict | None] = mapped_column(JSON)
    object: Mapped[str] = mapped_column(String(32))
    raw_bytes: Mapped[int] = mapped_column(BigInteger)
    stored_bytes: Mapped[int] = mapped_column(BigInteger)
    rel_error: Mapped[float] = mapped_column(Float)  # ||decoded - true|| / ||true||, 0 when lossless
    rel_norm: Mapped[float] = mapped_column(Float)  # ||finetuned - parent|| / ||parent||
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Ref(Base):
    """Branches and tags: the only rows that change, always by compare-and-swap."""

    __tablename__ = "refs"
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # "branch" | "tag"
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class RefLog(Base):
    __tablename__ = "reflog"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ref: Mapped[str] = mapped_column(String(255), index=True)
    old_version_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"))
    new_version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))
    action: Mapped[str] = mapped_column(String(32))
    message: Mapped[str | None] = mapped_column(Text)
    author: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Eval(Base):
    __tablename__ = "evals"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), index=True)
    suite: Mapped[str] = mapped_column(String(255))
    split: Mapped[str] = mapped_column(String(32))  # "ID" | "OOD" | "generalist" | ...
    metric: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    episodes: Mapped[int | None] = mapped_column(Integer)
    seed: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Keyframe(Base):
    """A version kept whole in the store so rebuilds of its descendants start there.

    A cache, not history: rows come and go (pin / unpin), the version they name never changes.
    """

    __tablename__ = "keyframes"
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), primary_key=True)
    reason: Mapped[str] = mapped_column(String(16))  # "auto" | "pin"
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Revocation(Base):
    """A skill name withdrawn from use: `audit` flags every checkpoint that contains it.

    Append-only like the history it annotates; the versions that hold the skill stay as they were.
    """

    __tablename__ = "revocations"
    skill_name: Mapped[str] = mapped_column(String(128), primary_key=True)
    reason: Mapped[str] = mapped_column(Text)
    author: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
