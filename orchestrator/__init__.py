"""maestro's orchestrator: spec, sweeps, run registry, backends and the `maestro` CLI."""
