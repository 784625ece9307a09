"""Checkpoints, trackers, webhooks, publishing, user hook scripts and validation hand-off."""

from simpletuner.config.option_types import BUILT, PLANNED, opt

GROUP = "Checkpoints, logging and publishing"

OPTIONS = [
    # Checkpoints
    opt("checkpoint_step_interval", "int", None,
        "Save a resumable checkpoint every this many steps; unset saves none by step.",
        aliases=("checkpointing_steps",), status=BUILT),
    opt("checkpoint_epoch_interval", "int", None,
        "Save a checkpoint every this many finished epochs, in addition to step-based ones.",
        status=BUILT),
    opt("checkpointing_rolling_steps", "int", None,
        "Also save rolling checkpoints every this many steps; only the newest few are kept.",
        status=BUILT),
    opt("checkpoints_rolling_total_limit", "int", 1,
        "How many rolling checkpoints to keep; older ones are deleted.", status=BUILT),
    opt("checkpointing_use_tempdir", "bool", False,
        "Accepted for compatibility: checkpoints are always written into a temporary folder and renamed into "
        "place once complete (with the manifest last), whatever this is set to.",
        status=BUILT),
    opt("disk_low_threshold", "str", None,
        "Free space needed before a checkpoint is saved, as bytes or a size like 500K, 50M, 100G, 1T; "
        "unset skips the check.", status=BUILT),
    opt("disk_low_action", "str", "stop",
        "What to do when free space is below disk_low_threshold: stop with an error, wait and recheck "
        "every 30 s, or run disk_low_script.",
        choices=("stop", "wait", "script"), status=BUILT),
    opt("disk_low_script", "str", None,
        "Executable run to free space when disk_low_action is script; training stops if it fails or frees "
        "too little.", status=BUILT),
    opt("post_checkpoint_script", "str", None,
        "Command run in the background after each checkpoint is written locally. Accepts placeholders "
        "such as {local_checkpoint_path} and {global_step}.", status=BUILT),
    # Trackers
    opt("report_to", "str", "none",
        "Tracker that receives metrics and validation images; all sends to every supported tracker.",
        choices=("tensorboard", "wandb", "comet_ml", "all", "none"), status=BUILT),
    opt("tracker_project_name", "str", "simpletuner",
        "Project name under which runs are grouped in the tracker.", status=BUILT),
    opt("tracker_run_name", "str", "simpletuner-testing",
        "Name of this run in the tracker.", status=BUILT),
    opt("tracker_image_layout", "str", "gallery",
        "How validation images are arranged in wandb: a gallery per prompt and size, or one table with a row "
        "per image (TensorBoard always shows image grids).", choices=("gallery", "table"),
        status=BUILT),
    # Webhooks
    opt("webhook_config", "str", None,
        "Webhook targets (Discord or plain HTTP) for training events, as inline JSON or a path to a JSON "
        "file. Set SIMPLETUNER_JOB_ID to fill the payload's job_id.", status=BUILT),
    opt("webhook_reporting_interval", "int", None,
        "Least number of seconds between progress updates sent to webhooks.", status=BUILT),
    # Hub and other publishing
    opt("push_to_hub", "bool", False,
        "Upload the finished model to the Hugging Face Hub.", status=PLANNED),
    opt("push_to_hub_background", "bool", False,
        "Do Hub uploads in a background worker so training continues; the final upload is still awaited.",
        status=PLANNED),
    opt("push_checkpoints_to_hub", "bool", False,
        "Also upload every intermediate checkpoint to the same Hub repository.", status=PLANNED),
    opt("hub_model_id", "str", None,
        "Hub repository name, also used for the output folder name; unset derives one from the run.",
        status=PLANNED),
    opt("publishing_config", "str", None,
        "Upload targets for the finished model besides the Hub, as inline JSON or a path to a JSON file "
        "holding a list of provider entries; s3 and backblaze_b2 are built, azure_blob and dropbox are not yet.",
        status=BUILT),
    opt("post_upload_script", "str", None,
        "Command run in the background after each upload (or save, when nothing is uploaded). Same "
        "placeholders as validation_external_script plus {remote_checkpoint_path}.", status=BUILT),
    opt("model_card_private", "bool", False,
        "Create the Hub repository as private.", status=PLANNED),
    opt("model_card_safe_for_work", "bool", False,
        "Leave out the default NSFW warning from the generated model card.", status=PLANNED),
    opt("model_card_note", "str", None,
        "Short note shown at the top of the generated model card.", status=PLANNED),
    opt("modelspec_comment", "str", None,
        "Text stored as modelspec.comment in saved safetensors metadata. A config file may give a list of "
        "lines; {env:NAME} is replaced by that environment variable.", status=PLANNED),
    opt("enable_watermark", "bool", False,
        "Add an invisible watermark to generated validation images.", status=PLANNED),
    # Validation hand-off and adapters
    opt("validation_method", "str", "simpletuner-local",
        "Run validation with the built-in pipeline, or hand it to validation_external_script.",
        choices=("simpletuner-local", "external-script"), status=BUILT),
    opt("validation_external_script", "str", None,
        "Command (shell-style quoting) run for validation when validation_method is external-script; "
        "placeholders like {local_checkpoint_path}, {global_step} and any validation_* value are filled "
        "in.", status=BUILT),
    opt("validation_external_background", "bool", False,
        "Start validation_external_script without waiting for it or checking its exit code.",
        status=BUILT),
    opt("validation_adapter_path", "str", None,
        "One extra LoRA attached only during validation: a local file or folder, org/repo, or "
        "org/repo:weights.safetensors. Cannot be combined with validation_adapter_config.",
        status=BUILT),
    opt("validation_adapter_name", "str", None,
        "Name given to the adapter from validation_adapter_path in logs.", status=BUILT),
    opt("validation_adapter_strength", "float", 1.0,
        "Scale (above 0) applied to the validation adapter.", status=BUILT),
    opt("validation_adapter_mode", "str", "adapter_only",
        "Validate with the adapter only, with and without it side by side, or not attach it at all.",
        choices=("adapter_only", "comparison", "none"), status=BUILT),
    opt("validation_adapter_config", "str", None,
        "Several validation adapter runs, as inline JSON or a JSON file: a list (or an object with a runs "
        "list) of entries with path, and optionally label, adapter_name, strength or adapters/paths.",
        status=BUILT),
    opt("validation_preview", "bool", False,
        "Decode intermediate validation latents with a tiny autoencoder and send them to webhooks while "
        "sampling runs.", status=PLANNED),
    opt("validation_preview_steps", "int", 1,
        "Decode a preview every this many sampling steps.", status=PLANNED),
    opt("eval_loss_disable", "bool", False,
        "Skip the evaluation-loss pass even when an eval dataset exists (CLIP scoring still runs).",
        status=BUILT),
]
