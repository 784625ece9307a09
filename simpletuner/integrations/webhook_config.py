"""Reading ``webhook_config``: inline JSON or a JSON file with one target or a list of targets.

A target is an object::

    {"webhook_url": "https://...",      # or a list of URLs sharing the settings below
     "webhook_type": "raw",             # "raw" (JSON event) or "discord" (chat message)
     "log_level": "info",               # optional: least severity sent (debug, info, warning, error, critical)
     "events": ["training.checkpoint"], # optional: only these event types
     "message_prefix": "[my box] ",     # optional: put before every message text
     "ssl_no_verify": false}            # optional: accept self-signed HTTPS certificates
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from simpletuner.config.errors import ConfigError

WEBHOOK_TYPES = ("raw", "discord")
SEVERITIES = ("debug", "info", "warning", "error", "critical")
KNOWN_KEYS = ("webhook_url", "callback_url", "webhook_type", "log_level", "events", "message_prefix", "ssl_no_verify")


@dataclass(frozen=True)
class WebhookTarget:
    url: str
    kind: str = "raw"
    log_level: str = "info"
    events: tuple[str, ...] | None = None
    message_prefix: str = ""
    verify_ssl: bool = True

    def accepts(self, event_type: str, severity: str) -> bool:
        if self.events is not None and event_type not in self.events:
            return False
        return SEVERITIES.index(severity) >= SEVERITIES.index(self.log_level)


def _fail(source: str, problem: str) -> ConfigError:
    return ConfigError("webhook_config", f"webhook_config ({source}): {problem}")


def read_webhook_config(value: str) -> tuple[list, str]:
    """The raw JSON entries and a description of where they came from."""
    text = str(value).strip()
    if text.startswith(("{", "[")):
        source = "inline JSON"
    else:
        source = text
        if not os.path.isfile(text):
            raise _fail(source, "no such file. Give the path to a JSON file or inline JSON such as "
                                '{"webhook_url": "https://...", "webhook_type": "raw"}.')
        with open(text, encoding="utf-8") as handle:
            text = handle.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(source, f"not valid JSON ({exc}). Fix the JSON syntax.") from None
    entries = data if isinstance(data, list) else [data]
    return entries, source


def _target_urls(entry: dict, source: str) -> list[str]:
    """webhook_url (discord and raw) or callback_url (the raw type's name for it)."""
    if "webhook_url" in entry and "callback_url" in entry:
        raise _fail(source, "give either webhook_url or callback_url, not both.")
    urls = entry.get("webhook_url", entry.get("callback_url"))
    urls = [urls] if isinstance(urls, str) else urls
    if not urls or not all(isinstance(url, str) and url.startswith(("http://", "https://")) for url in urls):
        raise _fail(source, f"webhook_url (or callback_url for raw targets) must be an http(s) URL or a list of them, "
                            f"got {urls!r}.")
    return urls


def _parse_entry(entry, source: str) -> list[WebhookTarget]:
    if not isinstance(entry, dict):
        raise _fail(source, f"each target must be a JSON object, got {entry!r}.")
    unknown = sorted(set(entry) - set(KNOWN_KEYS))
    if unknown:
        raise _fail(source, f"unknown key(s) {', '.join(unknown)}. Known keys: {', '.join(KNOWN_KEYS)}.")
    kind = entry.get("webhook_type", "raw")
    if kind not in WEBHOOK_TYPES:
        raise _fail(source, f"webhook_type {kind!r} is not one of {', '.join(WEBHOOK_TYPES)}.")
    level = str(entry.get("log_level", "info")).lower()
    if level not in SEVERITIES:
        raise _fail(source, f"log_level {entry['log_level']!r} is not one of {', '.join(SEVERITIES)}.")
    events = entry.get("events")
    if events is not None and not (isinstance(events, list) and all(isinstance(e, str) for e in events)):
        raise _fail(source, f"events must be a list of event type names, got {events!r}.")
    return [WebhookTarget(url=url, kind=kind, log_level=level, events=tuple(events) if events is not None else None,
                          message_prefix=str(entry.get("message_prefix", "")),
                          verify_ssl=not bool(entry.get("ssl_no_verify", False)))
            for url in _target_urls(entry, source)]


def load_webhook_targets(value: str | None) -> list[WebhookTarget]:
    """Targets from the option's value; raises ConfigError naming the problem and the fix."""
    if value in (None, ""):
        return []
    entries, source = read_webhook_config(value)
    targets = [target for entry in entries for target in _parse_entry(entry, source)]
    if not targets:
        raise _fail(source, "no webhook targets found. Add at least one object with a webhook_url.")
    return targets
