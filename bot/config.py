"""Settings from the environment: the only module that reads `os.environ`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DATABASE_URL = "sqlite:///recon.db"


def _secrets(value: str | None) -> tuple[str, ...]:
    return tuple(s.strip() for s in (value or "").split(",") if s.strip())


class SettingsError(ValueError):
    """An environment variable has a value we cannot use."""


class NotConfigured(RuntimeError):
    """Something asked for needs a setting that is not there (a platform's API key, a source)."""


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if not value:
        return default
    if not value.isdigit() or int(value) <= 0:
        raise SettingsError(f"{name}: must be a positive whole number (got {value!r})")
    return int(value)


@dataclass(frozen=True)
class Settings:
    config_path: Path = Path("recon.toml")
    database_url: str = DEFAULT_DATABASE_URL
    stripe_api_key: str | None = field(default=None, repr=False)
    stripe_webhook_secrets: tuple[str, ...] = field(default=(), repr=False)
    stripe_api_base: str | None = None
    orb_api_key: str | None = field(default=None, repr=False)
    orb_webhook_secrets: tuple[str, ...] = field(default=(), repr=False)
    orb_api_base: str | None = None
    slack_bot_token: str | None = field(default=None, repr=False)
    slack_signing_secret: str | None = field(default=None, repr=False)
    slack_api_url: str | None = None
    public_url: str | None = None
    jira_base_url: str | None = None
    jira_email: str | None = None
    jira_api_token: str | None = field(default=None, repr=False)
    linear_api_key: str | None = field(default=None, repr=False)
    linear_api_url: str | None = None
    webhook_sink_secret: str | None = field(default=None, repr=False)
    webhook_max_bytes: int = 1024 * 1024
    redis_url: str | None = field(default=None, repr=False)  # shares the platforms' rate budget

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        return cls(
            config_path=Path(env.get("RECON_CONFIG") or "recon.toml"),
            database_url=env.get("RECON_DATABASE_URL") or DEFAULT_DATABASE_URL,
            stripe_api_key=env.get("STRIPE_API_KEY") or None,
            stripe_webhook_secrets=_secrets(env.get("STRIPE_WEBHOOK_SECRET")),
            stripe_api_base=env.get("STRIPE_API_BASE") or None,
            orb_api_key=env.get("ORB_API_KEY") or None,
            orb_webhook_secrets=_secrets(env.get("ORB_WEBHOOK_SECRET")),
            orb_api_base=env.get("ORB_API_BASE") or None,
            slack_bot_token=env.get("SLACK_BOT_TOKEN") or None,
            slack_signing_secret=env.get("SLACK_SIGNING_SECRET") or None,
            slack_api_url=env.get("SLACK_API_URL") or None,
            public_url=env.get("RECON_PUBLIC_URL") or None,
            jira_base_url=env.get("JIRA_BASE_URL") or None,
            jira_email=env.get("JIRA_EMAIL") or None,
            jira_api_token=env.get("JIRA_API_TOKEN") or None,
            linear_api_key=env.get("LINEAR_API_KEY") or None,
            linear_api_url=env.get("LINEAR_API_URL") or None,
            webhook_sink_secret=env.get("RECON_WEBHOOK_SIGNING_SECRET") or None,
            webhook_max_bytes=_int(env, "RECON_WEBHOOK_MAX_BYTES", 1024 * 1024),
            redis_url=env.get("RECON_REDIS_URL") or None,
        )
