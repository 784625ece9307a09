"""Uploading the finished run to the ``publishing_config`` providers, then running ``post_upload_script``.

When: once, on the main process, after the final model was saved and after the
final validation (its callback comes earlier in CALLBACK_FACTORIES). Checkpoints
are not published here; the reference ties checkpoint uploads to the Hub only.

What: the top-level files and folders of ``output_dir`` (the saved model or
LoRA, EMA weights, validation images, benchmarks, ...), except

- checkpoint folders (``checkpoint-N``, ``rolling-checkpoint-N``): resumable
  training state, large and not the result of the run;
- the tracker log folder (``logging_dir``, ``logs`` by default) and ``debug/``
  (sample-id logs): diagnostics;
- hidden entries (names starting with "."), such as unfinished saves;
- ``published.json``, the record this module writes.

Where: ``<base_path>/<basename of output_dir>/<path inside output_dir>`` in
the bucket. Each object carries metadata with the job id (SIMPLETUNER_JOB_ID),
the validation type (``final``), the model family and the global step. The
folder's URI (``s3://bucket/prefix`` or ``public_base_url/prefix``) is logged,
given to ``post_upload_script`` as ``{remote_checkpoint_path}`` and recorded in
``output_dir/published.json``.

A provider that fails is logged and the others still upload; the run then ends
with PublishingFailed so the failure is not missed (the model is saved locally).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
from dataclasses import asdict, dataclass

from tqdm import tqdm

from simpletuner.atomic_files import staged_path
from simpletuner.config.settings import Settings
from simpletuner.integrations.publishing_config import S3Target, load_publishing_targets
from simpletuner.integrations.user_scripts import ScriptRunner, command_words, script_errors, script_placeholders
from simpletuner.integrations.webhooks import job_id as run_job_id
from simpletuner.training.callbacks import Callback

logger = logging.getLogger(__name__)

RECORD_NAME = "published.json"
DIAGNOSTIC_FOLDERS = ("debug",)
CHECKPOINT_FOLDER = re.compile(r"^(rolling-)?checkpoint-\d+$")  # complete or not: never a final artifact


class PublishingFailed(RuntimeError):
    """At least one publishing_config provider could not upload the run."""


@dataclass(frozen=True)
class Publication:
    provider: str
    uri: str
    files: int
    job_id: str | None
    validation_type: str
    global_step: int


def excluded_names(output_dir: str, logging_dir: str | None) -> set[str]:
    """Top-level names in output_dir that are not final artifacts (see the module docstring)."""
    names = {RECORD_NAME, *DIAGNOSTIC_FOLDERS}
    names.update(entry for entry in os.listdir(output_dir) if CHECKPOINT_FOLDER.match(entry))
    logs = os.path.relpath(os.path.join(output_dir, logging_dir or "logs"), output_dir)
    if not logs.startswith(os.pardir):
        names.add(logs.split(os.sep)[0])
    return names


def final_artifacts(output_dir: str, logging_dir: str | None = "logs") -> list[str]:
    """Paths (relative to output_dir, "/"-separated) of every file to publish, sorted."""
    skip = excluded_names(output_dir, logging_dir)
    found = []
    for entry in sorted(os.listdir(output_dir)):
        if entry in skip or entry.startswith("."):
            continue
        path = os.path.join(output_dir, entry)
        if os.path.isfile(path):
            found.append(entry)
            continue
        for folder, subfolders, files in os.walk(path):
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
            relative = os.path.relpath(folder, output_dir).replace(os.sep, "/")
            found.extend(f"{relative}/{name}" for name in sorted(files) if not name.startswith("."))
    return found


def remote_prefix(target: S3Target, output_dir: str) -> str:
    run_name = os.path.basename(os.path.normpath(os.path.abspath(output_dir)))
    return f"{target.base_path}/{run_name}" if target.base_path else run_name


def _ascii(value) -> str:
    """S3 metadata values travel in HTTP headers, which must be ASCII."""
    return str(value).encode("ascii", "backslashreplace").decode("ascii")


def upload_to_s3(target: S3Target, output_dir: str, files: list[str], metadata: dict[str, str]) -> str:
    """Upload files (relative to output_dir) under the target's prefix; returns the folder's URI."""
    from simpletuner.data.storage.s3 import S3Storage

    client = S3Storage(target.bucket, endpoint_url=target.endpoint_url, region=target.region,
                       access_key=target.access_key, secret_key=target.secret_key).client
    prefix = remote_prefix(target, output_dir)
    extra = {"Metadata": {key: _ascii(value) for key, value in metadata.items()}}
    total = sum(os.path.getsize(os.path.join(output_dir, name)) for name in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"Publishing to {target.provider}://{target.bucket}",
              leave=False) as bar:
        for name in files:
            client.upload_file(os.path.join(output_dir, name), target.bucket, f"{prefix}/{name}",
                               ExtraArgs=extra, Callback=bar.update)
    return target.uri(prefix)


def write_record(output_dir: str, publications: list[Publication]) -> str:
    """Write output_dir/published.json atomically; returns its path."""
    path = os.path.join(output_dir, RECORD_NAME)
    with staged_path(path) as staging, open(staging, "w", encoding="utf-8") as out:
        json.dump([asdict(item) for item in publications], out, indent=2)
    return path


def _upload_errors():
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    return (Boto3Error, BotoCoreError, ClientError, OSError)


class PublishingCallback(Callback):
    def __init__(self, settings: Settings, targets: list[S3Target]):
        self.settings = settings
        self.targets = targets
        self.runner = ScriptRunner("post_upload_script")
        self.published: list[Publication] = []

    def on_train_end(self, trainer, output_dir: str) -> None:
        step = trainer.state.global_step
        if not self.targets:  # nothing to upload: the script still runs, for local automation
            self._run_script(output_dir, step, "")
        failures = self.publish(output_dir, step)
        self.runner.wait_all()
        if failures:
            raise PublishingFailed("publishing_config: upload failed for " + "; ".join(failures) + ". The model "
                                   "is saved in " + os.path.abspath(output_dir) + "; check the bucket name, "
                                   "credentials and endpoint_url, then upload it again.")

    def publish(self, output_dir: str, step: int) -> list[str]:
        """Upload to every target, running post_upload_script after each success; returns the failures."""
        job_id = run_job_id(self.settings)
        metadata = {"simpletuner-job-id": job_id or "", "simpletuner-validation-type": "final",
                    "simpletuner-model-family": self.settings.model_family or "", "simpletuner-global-step": step}
        files = final_artifacts(output_dir, self.settings.logging_dir) if self.targets else []
        failures = []
        for target in self.targets:
            where = f"{target.provider} bucket {target.bucket!r}"
            try:
                uri = upload_to_s3(target, output_dir, files, metadata)
            except _upload_errors() as exc:
                logger.error("Publishing to %s failed: %s", where, exc)
                failures.append(f"{where} ({exc})")
                continue
            logger.info("Published %d file(s) from %s to %s", len(files), output_dir, uri)
            self.published.append(Publication(target.provider, uri, len(files), job_id, "final", step))
            write_record(output_dir, self.published)
            self._run_script(output_dir, step, uri)
        return failures

    def _run_script(self, output_dir: str, step: int, uri: str) -> None:
        if not self.settings.post_upload_script:
            return
        values = script_placeholders(self.settings, local_checkpoint_path=output_dir, global_step=step,
                                     remote_checkpoint_path=uri)
        words = command_words(self.settings.post_upload_script, values)
        logger.info("Running post_upload_script: %s", shlex.join(words))
        self.runner.start(words)


def publishing_callback(settings: Settings) -> PublishingCallback | None:
    """Callback factory (see CALLBACK_FACTORIES): None when neither publishing_config nor post_upload_script is set."""
    if not settings.publishing_config and not settings.post_upload_script:
        return None
    targets = load_publishing_targets(settings.publishing_config)
    errors = script_errors(settings, "post_upload_script")
    if errors:
        raise errors[0]
    return PublishingCallback(settings, targets)
