"""Where runs execute. Each backend is one module behind the ``Backend`` protocol."""

from __future__ import annotations

from orchestrator.backends.base import Backend
from orchestrator.errors import UserError
from orchestrator.profiles import LocalProfile, Profile, SlurmProfile


def get_backend(profile: Profile) -> Backend:
    if isinstance(profile, LocalProfile):
        from orchestrator.backends.local import LocalBackend

        return LocalBackend(profile)
    if isinstance(profile, SlurmProfile):
        from orchestrator.backends.slurm import SlurmBackend

        return SlurmBackend(profile)

    raise UserError(f"the {profile.backend} backend is not available yet; use a local or slurm profile")


__all__ = ["Backend", "get_backend"]
