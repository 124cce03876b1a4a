"""The capsule: Forge's unit of knowledge, with versions and lineage."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from pydantic import AfterValidator, ConfigDict, Field

from forge.models.base import ForgeBaseModel, UtcDatetime


def _without_nul(text: str) -> str:
    # PostgreSQL's text columns cannot hold NUL, so the embedded store rejects it as well, and
    # a capsule reads the same on both backends.
    if "\x00" in text:
        raise ValueError(
            f"contains a NUL character (U+0000) at position {text.index(chr(0))}, which "
            "PostgreSQL cannot store. Remove it, or encode binary data as base64"
        )
    return text


CapsuleType = Annotated[str, Field(min_length=1, max_length=200)]
Title = Annotated[str, Field(max_length=1_000)]
Content = Annotated[str, Field(max_length=100_000)]

# Inputs reject NUL; stored capsules are read as they are, also if written before that check.
CapsuleTypeInput = Annotated[CapsuleType, AfterValidator(_without_nul)]
TitleInput = Annotated[Title, AfterValidator(_without_nul)]
ContentInput = Annotated[Content, AfterValidator(_without_nul)]

MUTABLE_FIELDS = ("title", "content", "capsule_type")
"""Fields that an update may change; the rest is fixed at creation."""


class Capsule(ForgeBaseModel):
    """A capsule as stored; `version` counts its states: "1" at creation, +1 per update."""

    model_config = ConfigDict(frozen=True)

    id: UUID
    owner_id: UUID
    capsule_type: CapsuleType
    title: Title = ""
    content: Content = ""
    parent_id: UUID | None = None
    version: str = "1"
    created_at: UtcDatetime
    updated_at: UtcDatetime
    deleted_at: UtcDatetime | None = None

    @property
    def deleted(self) -> bool:
        return self.deleted_at is not None


class CapsuleCreate(ForgeBaseModel):
    """Input of a capsule creation."""

    model_config = ConfigDict(extra="forbid")

    owner_id: UUID
    capsule_type: CapsuleTypeInput
    title: TitleInput = ""
    content: ContentInput = ""
    parent_id: UUID | None = Field(default=None, description="Capsule this one is derived from")


class CapsuleUpdate(ForgeBaseModel):
    """Input of a capsule update: only the fields given are changed."""

    model_config = ConfigDict(extra="forbid")

    title: TitleInput | None = None
    content: ContentInput | None = None
    capsule_type: CapsuleTypeInput | None = None
    expected_version: str | None = Field(
        default=None,
        pattern=r"^[1-9][0-9]*$",
        description="Reject the update if the capsule is no longer at this version",
    )


def next_version(version: str) -> str:
    return str(int(version) + 1)
