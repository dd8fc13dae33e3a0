"""The deployment files of docs/deploy.md stay true to prismd: the compose file parses, and
every prismd setting it passes is one prismd reads (a renamed variable would break it silently,
since this machine has no Docker engine to run it)."""

from __future__ import annotations

from pathlib import Path

import yaml

from prismd.config import ENV_OVERRIDES, load_settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_compose_file_runs_prismd_on_postgres_and_redis(tmp_path):
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "prismd1", "prismd2", "caddy"} <= set(services)
    for name in ("prismd1", "prismd2"):
        env = services[name]["environment"]
        prismd_vars = {k for k in env if k.startswith("PRISMD_") and k != "PRISMD_HOME"}
        assert prismd_vars <= set(ENV_OVERRIDES), prismd_vars - set(ENV_OVERRIDES)
        assert env["PRISMD_DATABASE_URL"].startswith("postgresql://")
        assert env["PRISMD_REDIS_URL"].startswith("redis://")
        command = services[name]["command"]
        assert command[:2] == ["prismd", "serve"] and "--workers" in command
    # The variables configure what the compose file means them to.
    settings = load_settings(
        env={
            "PRISMD_HOME": str(tmp_path),
            "PRISMD_DATABASE_URL": "postgresql://u:p@postgres:5432/prismd",
            "PRISMD_REDIS_URL": "redis://redis:6379/0",
            "PRISMD_HOST": "0.0.0.0",
        }
    )
    assert settings.store.url and settings.bus.url and settings.server.host == "0.0.0.0"
    caddy = (DEPLOY / "Caddyfile").read_text()
    assert "prismd1:3000" in caddy and "prismd2:3000" in caddy and "/api/health" in caddy
