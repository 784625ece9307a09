"""Configuration checks for the integrations, run with the other checks before any model loads."""

from __future__ import annotations

from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings
from simpletuner.integrations.disk_guard import disk_guard_errors
from simpletuner.integrations.publishing_config import load_publishing_targets
from simpletuner.integrations.trackers import tracker_errors
from simpletuner.integrations.user_scripts import script_errors
from simpletuner.integrations.webhook_config import load_webhook_targets


def webhook_errors(settings: Settings) -> list[ConfigError]:
    try:
        load_webhook_targets(settings.webhook_config)
    except ConfigError as exc:
        return [exc]
    return []


def publishing_errors(settings: Settings) -> list[ConfigError]:
    try:
        load_publishing_targets(settings.publishing_config)
    except ConfigError as exc:
        return [exc]
    return []


def integration_errors(settings: Settings) -> list[ConfigError]:
    return (tracker_errors(settings) + webhook_errors(settings) + disk_guard_errors(settings)
            + script_errors(settings, "post_checkpoint_script") + publishing_errors(settings)
            + script_errors(settings, "post_upload_script"))
