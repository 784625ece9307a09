"""Delivering training events to webhook targets.

An event has a type (``training.status``, ``training.checkpoint``,
``lifecycle.stage``, ``error``, or any name another part chooses), a
severity, a message and extra fields. ``raw`` targets receive the whole event
as JSON; ``discord`` targets receive a chat message. Delivery happens on a
background thread so a slow endpoint never holds up training, and a failed
delivery is logged, never raised.

Other parts of the trainer call ``send_event(kind, payload)``; it goes to
the webhooks of the running job, or nowhere when none are configured.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import ssl
import threading
import time
import urllib.error
import urllib.request

from simpletuner.config.settings import Settings
from simpletuner.integrations.webhook_config import WebhookTarget

logger = logging.getLogger(__name__)

DISCORD_LIMIT = 2000  # characters Discord accepts in one message
REQUEST_TIMEOUT_S = 10


def job_id(settings: Settings) -> str | None:
    """The SIMPLETUNER_JOB_ID environment variable; None (JSON null) when it is unset, as SimpleTuner sends."""
    return os.environ.get("SIMPLETUNER_JOB_ID") or None


def event_body(target: WebhookTarget, event: dict) -> dict:
    """What is POSTed to one target for one event."""
    if target.kind == "discord":
        job = f"[{event['job_id']}] " if event.get("job_id") else ""
        text = f"{target.message_prefix}{job}{event['message']}"
        return {"content": text[:DISCORD_LIMIT]}
    body = dict(event)
    if target.message_prefix:
        body["message"] = target.message_prefix + body["message"]
    return body


def post_json(url: str, body: dict, verify_ssl: bool = True) -> None:
    data = json.dumps(body, default=str).encode("utf-8")
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "simpletuner"})
    context = None
    if not verify_ssl:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S, context=context) as response:
        response.read()


class WebhookSender:
    """Queues events for a job and posts them, in order, from one background thread."""

    def __init__(self, targets: list[WebhookTarget], job: str):
        self.targets = targets
        self.job_id = job
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._deliver_forever, name="simpletuner-webhooks", daemon=True)
        self._thread.start()

    def send(self, kind: str, message: str, severity: str = "info", fields: dict | None = None) -> None:
        event = {**(fields or {}), "type": kind, "job_id": self.job_id, "severity": severity, "message": message,
                 "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for target in self.targets:
            if target.accepts(kind, severity):
                self._queue.put((target, event_body(target, event)))

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far was delivered (or failed); False on timeout."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def _deliver_forever(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, threading.Event):
                item.set()
                continue
            target, body = item
            try:
                post_json(target.url, body, target.verify_ssl)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                logger.warning("Webhook delivery to %s failed: %s", target.url, exc)


_active: WebhookSender | None = None


def set_active_sender(sender: WebhookSender | None) -> None:
    global _active
    _active = sender


def send_event(kind: str, payload: dict | None = None, message: str | None = None, severity: str = "info") -> None:
    """Send an event to the running job's webhooks; does nothing when none are configured."""
    sender = _active
    if sender is None:
        return
    fields = dict(payload or {})
    text = fields.pop("message", None)
    sender.send(kind, message or text or kind, severity=severity, fields=fields)
