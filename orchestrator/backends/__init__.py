"""Where runs execute. Each backend is one module behind the ``Backend`` protocol."""

from __future__ import annotations

from orchestrator.backends.base import Backend
from orchestrator.errors import UserError
from orchestrator.profiles import LocalProfile, Profile, RayProfile, SlurmProfile


def get_backend(profile: Profile) -> Backend:
    if isinstance(profile, LocalProfile):
        from orchestrator.backends.local import LocalBackend

        return LocalBackend(profile)
    if isinstance(profile, SlurmProfile):
        from orchestrator.backends.slurm import SlurmBackend

        return SlurmBackend(profile)
    if isinstance(profile, RayProfile):
        from orchestrator.backends.ray import RayBackend

        return RayBackend(profile)
    raise UserError(f"the {profile.backend} backend is not available; use a local, slurm or ray profile")


__all__ = ["Backend", "get_backend"]
