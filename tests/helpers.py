"""Shared test helpers."""

from __future__ import annotations

import os


def cpu_env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """Environment for a subprocess that runs JAX on the CPU, optionally as `devices`
    simulated devices (XLA's host-platform device count)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    if devices:
        flag = f"--xla_force_host_platform_device_count={devices}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    return env
