"""What a stage reports when it ends: printed for people, and as JSON with --json.

It lives in the store wing (it is read off an artifact) so that training helpers below the stages can
build one without importing `looper.stages`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from looper.store.artifacts import Artifact


@dataclass
class StageResult:
    """What a stage reports: printed for people, and as JSON with --json."""

    stage: str
    version: str
    path: str
    skipped: bool = False
    counts: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_artifact(cls, artifact: Artifact, *, skipped: bool = False) -> StageResult:
        m = artifact.manifest
        return cls(
            artifact.stage,
            artifact.version,
            str(artifact.path),
            skipped,
            m.get("counts", {}),
            m.get("metrics", {}),
        )

    @classmethod
    def up_to_date(cls, artifact: Artifact) -> StageResult:
        """The run found this exact version already made: report it, do nothing."""
        return cls.from_artifact(artifact, skipped=True)

    def as_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "version": self.version,
            "path": self.path,
            "skipped": self.skipped,
            "counts": self.counts,
            "metrics": self.metrics,
        }
