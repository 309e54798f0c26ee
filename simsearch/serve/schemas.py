"""Request and response bodies of the HTTP API, so /docs shows the JSON shapes and requests are validated."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from ..dedup.finder import DEFAULT_THRESHOLD


class ErrorOut(BaseModel):
    error: str = Field(description="One line saying what went wrong.")


class MatchOut(BaseModel):
    id: int
    path: str
    score: float = Field(description="Cosine similarity to the query, 1.0 = identical.")
    width: int | None
    height: int | None
    inliers: int | None = Field(None, description="RANSAC inliers against the query (only with rerank).")
    stage: str | None = Field(
        None, description="Only with rerank: the first stage that found it, global, words (visual words) or both."
    )
    time_s: float | None = Field(None, description="A video: seconds into it of the best-matching frame.")


class RerankOut(BaseModel):
    candidates: int = Field(
        description="Candidates to verify (the top `rerank` of the global ranking, fused with the visual words')."
    )
    checked: int = Field(description="Candidates verified before the time limit; the others have no `inliers`.")
    complete: bool = Field(description="Whether every candidate was verified in time.")


class SearchOut(BaseModel):
    query: str = Field(description="The indexed file's path, or the uploaded file's name.")
    query_id: int | None = Field(description="Index id of the query (null for an upload).")
    width: int | None
    height: int | None
    matches: list[MatchOut]
    rerank: RerankOut | None = Field(None, description="Only with rerank: how much of it was done in time.")


class MemberOut(BaseModel):
    id: int
    path: str
    score: float = Field(description="Similarity to the kept file.")
    keep: bool = Field(description="Whether the keep rules keep this file.")
    size: int | None = Field(description="File size in bytes.")
    width: int | None
    height: int | None


class ShotOut(BaseModel):
    sharpness: float | None = Field(None, description="Variance of the Laplacian of a small grey copy.")
    clipped: float | None = Field(None, description="Share of blown or crushed pixels.")
    score: float | None = Field(None, description="Best-shot score: the highest is listed first.")


class GroupOut(BaseModel):
    kind: Literal["exact", "near", "similar"] = Field(
        description="exact and near: copies of one capture; similar: other shots of one scene (best shot first)."
    )
    files: list[str] = Field(description="Paths, the kept file first (as `simsearch dedup --json`).")
    min_score: float
    keep: str
    scores: list[float]
    ids: list[int]
    members: list[MemberOut]
    shots: list[ShotOut] | None = Field(None, description="similar groups: each file's shot quality.")


class DuplicatesOut(BaseModel):
    threshold: float
    groups: list[GroupOut] = Field(description="This page of the groups.")
    duplicates: int = Field(description="Copies that could go, over all copy groups.")
    similar_files: int = Field(0, description="Other shots in similar groups (removed only when asked).")
    group: Literal["connected", "star"]
    keep: list[str]
    total_groups: int
    offset: int
    limit: int
    generation: int


class ResolveIn(BaseModel):
    """Remove some files of one duplicate group; `ids` is the whole group as listed, to detect a changed group."""

    ids: list[int] = Field(min_length=2, max_length=10_000, description="Every member of the group, as listed.")
    remove: list[int] = Field(min_length=1, max_length=10_000, description="The members to move or trash.")
    action: Literal["delete", "move"] = Field("delete", description="delete: into the index's trash (undoable).")
    threshold: float = Field(DEFAULT_THRESHOLD, ge=0.8, le=1.0, description="The listing's threshold (0.8 to 1).")
    group: Literal["connected", "star"] = "connected"
    keep: str | None = None
    include_similar: bool = Field(False, description="Allow removing other shots of a similar group (not copies).")


class MovedOut(BaseModel):
    id: int
    from_: str = Field(alias="from")
    to: str | None


class ResolveOut(BaseModel):
    action: Literal["delete", "move"]
    moved: list[MovedOut]
    undo: str | None = Field(description="Name of the undo manifest, for POST /api/undo.")


class UndoIn(BaseModel):
    undo: str = Field(min_length=1, max_length=200, description="File name of an undo manifest (from resolve).")


class ConflictOut(BaseModel):
    path: str = Field(description="The original path, not restored.")
    at: str = Field(description="Where the file stays.")
    reason: str


class UndoOut(BaseModel):
    undo: str
    restored: int
    missing: list[str]
    permanently_deleted: int
    reindexed: int
    conflicts: list[ConflictOut] = Field(default_factory=list, description="Files left where they are, and why.")


class UndoableOut(BaseModel):
    undo: str = Field(description="The action's manifest name, for POST /api/undo.")
    action: str | None = None
    created: str | None = None
    state: str | None = Field(None, description="done, or partly-undone (some files could not go back yet).")
    files: int | None = None


class UndoListOut(BaseModel):
    manifests: list[UndoableOut]
