"""Where runs execute. Each backend is one module behind the ``Backend`` protocol."""

from __future__ import annotations

from orchestrator.backends.base import Backend
from orchestrator.profiles import LocalProfile, Profile


def get_backend(profile: Profile) -> Backend:
    if isinstance(profile, LocalProfile):
        from orchestrator.backends.local import LocalBackend

        return LocalBackend(profile)
    from orchestrator.errors import UserError

    raise UserError(f"the {profile.backend} backend is not available yet; use cluster_configs/local.yaml")


__all__ = ["Backend", "get_backend"]
