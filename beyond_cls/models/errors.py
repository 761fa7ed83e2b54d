"""The error every checkpoint problem raises (reading, layout, fit), naming the file."""

from __future__ import annotations

from pathlib import Path

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit the model; the message names the file."""

    def __init__(
        self,
        path: str | Path | None,
        problem: str,
        *,
        missing: tuple[str, ...] = (),
        unexpected: tuple[str, ...] = (),
    ) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        self.missing = tuple(missing)
        self.unexpected = tuple(unexpected)
        super().__init__(problem if path is None else f"checkpoint {str(path)!r}: {problem}")

    def with_hint(self, hint: str) -> CheckpointError:
        """The same error with one more line of advice (keeps missing/unexpected)."""
        if not hint:
            return self
        return CheckpointError(
            self.path, f"{self.problem}\n  hint: {hint}", missing=self.missing, unexpected=self.unexpected
        )
