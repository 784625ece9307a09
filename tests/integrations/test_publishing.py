"""publishing_config and post_upload_script: a real tiny LoRA run uploading to moto's S3 server on loopback."""

from __future__ import annotations

import json
import os
import stat
import sys
from types import SimpleNamespace

import pytest

from helpers.runs import base_config, train
from helpers.s3 import KEYS, moto_endpoint, s3_client
from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings
from simpletuner.config.validate import validate_settings
from simpletuner.integrations.publishing import (PublishingCallback, PublishingFailed, final_artifacts,
                                                 publishing_callback)
from simpletuner.integrations.publishing_config import S3Target, load_publishing_targets

pytest.importorskip("moto.server")

LORA = "pytorch_lora_weights.safetensors"
IMAGE_COUNT = 4  # sample images in this module's copy (the `images` fixture in tests/conftest.py)


@pytest.fixture(scope="module")
def endpoint():
    with moto_endpoint() as url:
        yield url


@pytest.fixture(autouse=True)
def no_ambient_aws(monkeypatch):
    """Credentials come only from the publishing entries; never from the developer's ~/.aws."""
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)


def make_bucket(endpoint: str, name: str):
    client = s3_client(endpoint)
    client.create_bucket(Bucket=name)
    return client


def keys_in(client, bucket: str) -> list[str]:
    return sorted(item["Key"] for item in client.list_objects_v2(Bucket=bucket).get("Contents", []))


def recording_script(tmp_path) -> tuple[str, object]:
    """An executable hook that appends its arguments as one JSON line to a file."""
    record = tmp_path / "hook_calls.jsonl"
    script = tmp_path / "hook.py"
    script.write_text(f"#!{sys.executable}\nimport json, sys\n"
                      f"with open({str(record)!r}, 'a') as out:\n    out.write(json.dumps(sys.argv[1:]) + '\\n')\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script), record


def calls(record) -> list[list[str]]:
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("sd1x")


def test_lora_run_publishes_final_artifacts_and_runs_the_hook(model, images, tmp_path, endpoint, monkeypatch):
    client = make_bucket(endpoint, "published-models")
    monkeypatch.setenv("SIMPLETUNER_JOB_ID", "job-42")
    script, record = recording_script(tmp_path)
    targets = [
        {"provider": "s3", "bucket": "published-models", "endpoint_url": endpoint, "base_path": "/runs/2024/",
         **KEYS},
        {"provider": "backblaze_b2", "bucket": "published-models", "endpoint_url": endpoint, "base_path": "cdn",
         "public_base_url": "https://cdn.example.com/models/", **KEYS},
    ]
    config = base_config("sd1x", model, tmp_path, images, max_train_steps=2, checkpoint_step_interval=1,
                         publishing_config=json.dumps(targets), tracker_run_name="pub-run",
                         post_upload_script=f"{script} {{remote_checkpoint_path}} {{local_checkpoint_path}} "
                                            f"{{global_step}} {{tracker_run_name}}")
    train(config)

    output = tmp_path / "output"
    assert (output / "checkpoint-1").is_dir() and (output / LORA).is_file()
    keys = keys_in(client, "published-models")
    assert f"runs/2024/output/{LORA}" in keys and f"cdn/output/{LORA}" in keys
    assert not [k for k in keys if "checkpoint-" in k or "/logs/" in k or k.endswith("published.json")], keys
    uploaded = client.get_object(Bucket="published-models", Key=f"runs/2024/output/{LORA}")
    assert uploaded["Body"].read() == (output / LORA).read_bytes()
    assert uploaded["Metadata"]["simpletuner-job-id"] == "job-42"
    assert uploaded["Metadata"]["simpletuner-validation-type"] == "final"

    s3_uri, public_uri = "s3://published-models/runs/2024/output", "https://cdn.example.com/models/cdn/output"
    assert calls(record) == [[s3_uri, str(output), "2", "pub-run"], [public_uri, str(output), "2", "pub-run"]]
    published = json.loads((output / "published.json").read_text())
    assert [(p["provider"], p["uri"], p["job_id"]) for p in published] == [("s3", s3_uri, "job-42"),
                                                                           ("backblaze_b2", public_uri, "job-42")]


def finished_run(tmp_path, step: int = 3) -> tuple[str, object]:
    output = tmp_path / "run-out"
    (output / "checkpoint-3").mkdir(parents=True)
    (output / LORA).write_bytes(b"weights")
    return str(output), SimpleNamespace(state=SimpleNamespace(global_step=step))


def test_hook_runs_without_any_upload(tmp_path):
    script, record = recording_script(tmp_path)
    output, trainer = finished_run(tmp_path)
    callback = publishing_callback(Settings({"post_upload_script": f"{script} [{{remote_checkpoint_path}}] "
                                                                   f"{{local_checkpoint_path}} {{global_step}}"}))
    callback.on_train_end(trainer, output)
    assert calls(record) == [["[]", output, "3"]]
    assert not os.path.exists(os.path.join(output, "published.json"))
    assert publishing_callback(Settings({})) is None


def test_a_failed_provider_does_not_stop_the_others_and_fails_the_run(tmp_path, endpoint):
    client = make_bucket(endpoint, "good-bucket")
    script, record = recording_script(tmp_path)
    output, trainer = finished_run(tmp_path)
    targets = [S3Target("s3", "missing-bucket", endpoint_url=endpoint, **KEYS),
               S3Target("s3", "good-bucket", endpoint_url=endpoint, **KEYS)]
    callback = PublishingCallback(Settings({"post_upload_script": f"{script} {{remote_checkpoint_path}}"}), targets)
    with pytest.raises(PublishingFailed, match="missing-bucket"):
        callback.on_train_end(trainer, output)
    assert keys_in(client, "good-bucket") == [f"run-out/{LORA}"]
    assert calls(record) == [["s3://good-bucket/run-out"]]


def test_final_artifacts_skip_checkpoints_logs_and_hidden_work(tmp_path):
    for folder in ("checkpoint-2", "rolling-checkpoint-3", ".checkpoint-4.tmp-x", "logs/proj", "tb", "debug",
                   "validation_images", "ema"):
        (tmp_path / folder).mkdir(parents=True)
    for name in ("checkpoint-2/state.pt", "logs/proj/events", "tb/events", "debug/ids.jsonl",
                 "validation_images/step2_a.png", "validation_images/.partial", "ema/weights.safetensors", LORA,
                 "published.json", ".DS_Store"):
        (tmp_path / name).write_bytes(b"x")
    expected = ["ema/weights.safetensors", LORA, "tb/events", "validation_images/step2_a.png"]
    assert final_artifacts(str(tmp_path)) == expected
    assert "tb/events" not in final_artifacts(str(tmp_path), logging_dir="tb")
    assert "logs/proj/events" in final_artifacts(str(tmp_path), logging_dir=str(tmp_path.parent / "elsewhere"))


def config_error(value) -> str:
    with pytest.raises(ConfigError) as caught:
        load_publishing_targets(value)
    assert caught.value.key == "publishing_config"
    return str(caught.value)


def test_config_forms_normalise_to_a_list(tmp_path):
    entry = {"provider": "s3", "bucket": "b", "base_path": "x/"}
    path = tmp_path / "publishing.json"
    path.write_text(json.dumps(entry))
    for value in (entry, [entry], json.dumps(entry), str(path)):
        assert load_publishing_targets(value) == [S3Target("s3", "b", base_path="x")]
    assert load_publishing_targets(None) == []


def test_bad_configs_name_the_key_and_fix(tmp_path):
    assert "not valid JSON" in config_error("[{")
    assert "no such file" in config_error(str(tmp_path / "nope.json"))
    assert "provider is missing" in config_error({"bucket": "b"})
    assert "bucket is missing" in config_error({"provider": "s3"})
    assert "unknown key(s) bukket" in config_error({"provider": "s3", "bucket": "b", "bukket": "c"})
    assert "secret_key is missing" in config_error({"provider": "s3", "bucket": "b", "access_key": "k"})
    assert "endpoint_url is missing" in config_error({"provider": "backblaze_b2", "bucket": "b"})
    assert "http(s) URL" in config_error({"provider": "s3", "bucket": "b", "public_base_url": "cdn.example"})
    assert "'ftp' is unknown" in config_error({"provider": "ftp"})
    assert "no providers" in config_error("[]")


@pytest.mark.parametrize("provider", ["azure_blob", "azure", "dropbox"])
def test_unbuilt_providers_are_refused_at_check_time(provider):
    settings = Settings({"model_family": "sd1x", "pretrained_model_name_or_path": "unused",
                         "publishing_config": json.dumps([{"provider": provider, "container": "c"}])})
    messages = [str(e) for e in validate_settings(settings) if e.key == "publishing_config"]
    assert len(messages) == 1 and f"provider {provider!r} is not implemented yet" in messages[0]


def test_check_reports_a_missing_post_upload_program(tmp_path):
    settings = Settings({"post_upload_script": str(tmp_path / "absent.sh") + " {remote_checkpoint_path}"})
    assert any(e.key == "post_upload_script" and "was not found" in str(e) for e in validate_settings(settings))
