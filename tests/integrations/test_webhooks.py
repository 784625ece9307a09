"""Webhook config parsing, payload shapes and delivery to a real local HTTP server."""

from __future__ import annotations

import json

import pytest

from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings
from simpletuner.integrations import webhooks
from simpletuner.integrations.webhook_callback import webhook_callback
from simpletuner.integrations.webhook_config import WebhookTarget, load_webhook_targets


def test_inline_object_and_file_list_give_targets(tmp_path):
    inline = load_webhook_targets('{"webhook_url": "http://127.0.0.1:9/hook", "webhook_type": "discord"}')
    assert inline == [WebhookTarget(url="http://127.0.0.1:9/hook", kind="discord")]
    path = tmp_path / "hooks.json"
    path.write_text(json.dumps([{"webhook_url": ["http://a/1", "http://b/2"], "log_level": "error"},
                                {"webhook_url": "https://c/3", "events": ["training.checkpoint"]}]))
    targets = load_webhook_targets(str(path))
    assert [t.url for t in targets] == ["http://a/1", "http://b/2", "https://c/3"]
    assert targets[0].log_level == "error" and targets[2].events == ("training.checkpoint",)


@pytest.mark.parametrize("value, fragment", [
    ("/no/such/hooks.json", "no such file"),
    ("{not json", "not valid JSON"),
    ('{"webhook_url": "ftp://x"}', "must be an http(s) URL"),
    ('{"webhook_url": "http://x", "webhook_type": "slack"}', "webhook_type 'slack'"),
    ('{"webhook_url": "http://x", "colour": "red"}', "unknown key(s) colour"),
    ('{"webhook_url": "http://x", "log_level": "loud"}', "log_level 'loud'"),
])
def test_bad_config_names_the_problem(value, fragment):
    with pytest.raises(ConfigError) as caught:
        load_webhook_targets(value)
    assert caught.value.key == "webhook_config" and fragment in str(caught.value)


def test_targets_filter_by_event_type_and_severity():
    target = WebhookTarget(url="http://x", log_level="warning", events=("error", "training.status"))
    assert target.accepts("error", "error")
    assert not target.accepts("training.status", "info")
    assert not target.accepts("training.checkpoint", "critical")


def test_discord_body_is_a_chat_message_with_the_job_id():
    event = {"type": "training.checkpoint", "job_id": "job-7", "message": "x" * 3000, "severity": "info"}
    body = webhooks.event_body(WebhookTarget(url="http://x", kind="discord", message_prefix="> "), event)
    assert set(body) == {"content"} and body["content"].startswith("> [job-7] x")
    assert len(body["content"]) == webhooks.DISCORD_LIMIT


def test_job_id_is_the_environment_variable_or_null(monkeypatch):
    monkeypatch.setenv("SIMPLETUNER_JOB_ID", "from-env")
    assert webhooks.job_id(Settings({"tracker_run_name": "named"})) == "from-env"
    monkeypatch.delenv("SIMPLETUNER_JOB_ID")
    assert webhooks.job_id(Settings({"tracker_run_name": "named"})) is None


def test_raw_targets_may_name_their_url_callback_url():
    from simpletuner.config.errors import ConfigError
    from simpletuner.integrations.webhook_config import load_webhook_targets

    (target,) = load_webhook_targets('{"webhook_type": "raw", "callback_url": "http://127.0.0.1:9/x"}')
    assert target.url == "http://127.0.0.1:9/x"
    for broken in ('{"webhook_type": "raw"}', '{"webhook_type": "carrier-pigeon", "webhook_url": "http://x"}'):
        with pytest.raises(ConfigError):
            load_webhook_targets(broken)


def test_sender_delivers_in_order_and_send_event_reaches_the_active_job(receiver):
    sender = webhooks.WebhookSender([WebhookTarget(url=receiver.url("/raw"))], "job-1")
    webhooks.send_event("validation", {"message": "ignored: no active sender"})
    webhooks.set_active_sender(sender)
    try:
        sender.send("training.status", "first", fields={"global_step": 1})
        webhooks.send_event("validation", {"message": "images ready", "images": 2})
        assert sender.flush(10)
    finally:
        webhooks.set_active_sender(None)
    first, second = [body for _, body in receiver.requests]
    assert first["type"] == "training.status" and first["job_id"] == "job-1" and first["global_step"] == 1
    assert second["type"] == "validation" and second["message"] == "images ready" and second["images"] == 2


def test_unreachable_target_is_logged_not_raised(caplog):
    sender = webhooks.WebhookSender([WebhookTarget(url="http://127.0.0.1:9/closed")], "job-2")
    sender.send("training.status", "hello")
    assert sender.flush(15)
    assert "Webhook delivery to http://127.0.0.1:9/closed failed" in caplog.text


def test_factory_is_off_without_config_and_reads_the_interval(monkeypatch):
    monkeypatch.setenv("SIMPLETUNER_JOB_ID", "r")
    assert webhook_callback(Settings()) is None
    callback = webhook_callback(Settings({"webhook_config": '{"webhook_url": "http://x"}',
                                          "webhook_reporting_interval": 5}))
    assert callback.interval_s == 5.0 and callback.job_id == "r"


def test_error_hook_sends_an_error_event_and_closes(receiver, monkeypatch):
    from types import SimpleNamespace

    from simpletuner.training.run_state import RunState

    monkeypatch.setenv("SIMPLETUNER_JOB_ID", "job-e")
    callback = webhook_callback(Settings({"webhook_config": json.dumps({"webhook_url": receiver.url("/raw")})}))
    trainer = SimpleNamespace(accelerator=SimpleNamespace(is_main_process=True), state=RunState(global_step=2),
                              total_steps=5)
    callback.on_train_start(trainer)
    callback.on_error(trainer, RuntimeError("out of memory"))
    assert callback.sender is None
    start, error = [body for _, body in receiver.requests]
    assert start["type"] == "training.status" and start["total_steps"] == 5
    assert (error["type"], error["severity"], error["job_id"]) == ("error", "error", "job-e")
    assert error["message"] == "Training failed: out of memory" and error["error_type"] == "RuntimeError"
