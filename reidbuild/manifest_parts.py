"""Pydantic building blocks shared by the manifest and the target plugins' own manifest models.

A target module (``reidbuild.targets.*``) declares its section of ``targets:`` with these, without
importing ``reidbuild.manifest`` (which is derived from the registered targets).
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Strict(BaseModel):
    """Unknown keys refused, values frozen, and YAML booleans never taken as numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: Any) -> Any:
        """YAML's true/yes/on are booleans; pydantic would quietly take them as 1 for a number."""
        if isinstance(value, bool) and cls.model_fields[info.field_name].annotation in NUMBERS:
            raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


NUMBERS = (int, float, Optional[int], Optional[float])


class Calibration(Strict):
    images: str
    batches: int = Field(ge=1, le=10_000)
    # percentile by default: entropy clipped post-ReLU ranges to about half on the test models (see README)
    method: Literal["entropy", "percentile", "minmax"] = "percentile"
    percentile: float = Field(99.999, gt=50, le=100)
