"""The training run itself: length, batch, learning rate, optimiser, EMA, timestep schedule, rollouts."""

from simpletuner.config.option_types import BUILT, PLANNED, opt

GROUP = "Training"

OPTIMIZERS = (
    "adamw_bf16", "ao-adamw8bit", "ao-adamw4bit", "ao-adamfp8", "ao-adamwfp8", "adamw_schedulefree",
    "adamw_schedulefree+aggressive", "adamw_schedulefree+no_kahan", "optimi-stableadamw", "optimi-adamw",
    "optimi-lion", "optimi-radam", "optimi-ranger", "optimi-adan", "optimi-adam", "optimi-sgd", "soap", "prodigy",
)

LR_SCHEDULERS = ("linear", "sine", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")

OPTIONS = [
    # Run layout
    opt("output_dir", "str", None,
        "Folder that receives checkpoints and the final model or adapter.", required=True, status=BUILT),
    opt("logging_dir", "str", "logs",
        "Folder for TensorBoard event files and other tracker logs.", status=BUILT),
    opt("seed", "int", None,
        "Random seed for a reproducible run; unset picks a fresh one each launch.", status=BUILT),
    opt("resume_from_checkpoint", "str", "latest",
        "Checkpoint to continue from: 'latest' (the newest complete one in output_dir, or a fresh start if "
        "there is none), a checkpoint name or path, or an s3:// URI.", status=BUILT),
    opt("num_processes", "int", 1,
        "Number of training processes (usually one per GPU); also read from TRAINING_NUM_PROCESSES.",
        status=BUILT),
    opt("num_machines", "int", 1,
        "Number of machines taking part in a multi-node run; also read from TRAINING_NUM_MACHINES.",
        status=BUILT),
    opt("i_know_what_i_am_doing", "bool", False,
        "Allow experimental overrides and skip the trainer's safety checks on unusual combinations.",
        status=BUILT),
    # Length and batch
    opt("num_train_epochs", "int", 1,
        "How many passes over the dataset to train for; 0 lets max_train_steps decide the length.",
        status=BUILT),
    opt("max_train_steps", "int", None,
        "Stop after this many optimiser steps; unset or 0 lets num_train_epochs decide the length.",
        status=BUILT),
    opt("train_batch_size", "int", 4,
        "Samples per forward/backward pass on each device.", status=BUILT),
    opt("gradient_accumulation_steps", "int", 1,
        "Sum gradients over this many batches before each optimiser step, for a larger effective batch "
        "without more memory.", status=BUILT),
    # Learning rate and optimiser
    opt("learning_rate", "float", 4e-7,
        "Peak learning rate reached after warmup. Full fine-tunes typically use 1e-7 to 1e-6, LoRA 1e-5 to "
        "1e-3.", status=BUILT),
    opt("optimizer", "str", None,
        "Optimiser used to update the trained weights.", choices=OPTIMIZERS, required=True, status=BUILT),
    opt("optimizer_config", "str", None,
        "Extra optimiser settings as comma-separated key=value pairs, e.g. d_coef=0.1 for prodigy.",
        status=BUILT),
    opt("lr_scheduler", "str", "cosine",
        "Shape of the learning-rate curve over the run.", choices=LR_SCHEDULERS, status=BUILT),
    opt("lr_warmup_steps", "int", 0,
        "Steps over which the learning rate climbs from zero to learning_rate.", status=BUILT),
    opt("lr_num_cycles", "int", 1,
        "Number of restarts for the cosine_with_restarts schedule.", status=BUILT),
    opt("lr_power", "float", 0.8,
        "Exponent of the polynomial schedule's decay (1.0 decays linearly).", status=BUILT),
    opt("train_text_encoder", "bool", False,
        "Also update the text encoder's weights (mainly useful for SD 1.x/2.x).", status=BUILT),
    opt("text_encoder_lr", "float", None,
        "Learning rate for the text encoder when it is trained; unset reuses learning_rate.", status=BUILT),
    opt("checkpoints_total_limit", "int", 5,
        "Keep at most this many checkpoints in output_dir, deleting the oldest; 0 or unset keeps all.",
        status=BUILT),
    opt("use_soft_min_snr", "bool", False,
        "Weight the loss with a smooth soft-min-SNR curve instead of a hard clamp; close to required for "
        "pixel-space models such as DeepFloyd.", status=BUILT),
    # EMA
    opt("use_ema", "bool", False,
        "Keep an exponential moving average of the trained weights alongside them, for steadier results at "
        "some memory and time cost.", status=BUILT),
    opt("ema_device", "str", "cpu",
        "Where the EMA copy lives between updates: on the accelerator (fast, uses VRAM) or on the CPU.",
        choices=("accelerator", "cpu"), status=BUILT),
    opt("ema_cpu_only", "bool", False,
        "With ema_device=cpu, update the EMA on the CPU too instead of moving it to the accelerator for "
        "each update.", status=BUILT),
    opt("ema_update_interval", "int", 1,
        "Update the EMA only every N optimiser steps.", status=BUILT),
    opt("ema_foreach_disable", "bool", False,
        "Update the EMA tensor by tensor instead of with torch._foreach kernels, for backends that mishandle "
        "them.", status=BUILT),
    opt("ema_decay", "float", 0.995,
        "EMA smoothing factor; values nearer 1.0 follow the trained weights more slowly.", status=BUILT),
    # Flow-matching timestep sampling
    opt("flow_sigmoid_scale", "float", 1.0,
        "Scale of the sigmoid (logit-normal) distribution used to draw flow-matching timesteps.",
        status=BUILT),
    opt("flow_use_uniform_schedule", "bool", False,
        "Draw flow-matching timesteps uniformly instead of from the sigmoid distribution.", status=BUILT),
    opt("flow_use_beta_schedule", "bool", False,
        "Draw flow-matching timesteps from a Beta(alpha, beta) distribution instead of the sigmoid one.",
        status=BUILT),
    opt("flow_beta_schedule_alpha", "float", 2.0,
        "Alpha parameter of the Beta timestep distribution.", status=BUILT),
    opt("flow_beta_schedule_beta", "float", 2.0,
        "Beta parameter of the Beta timestep distribution.", status=BUILT),
    opt("flow_schedule_shift", "float", 3.0,
        "Shift applied to flow-matching timesteps; larger values spend more training on noisy steps "
        "(composition), smaller on fine detail.", status=BUILT),
    opt("flow_schedule_auto_shift", "bool", False,
        "Derive the timestep shift from each batch's resolution instead of using flow_schedule_shift.",
        status=BUILT),
    opt("flux_fast_schedule", "bool", False,
        "Experimental timestep schedule aimed at Flux schnell training.", status=BUILT),
    # Diff2Flow
    opt("diff2flow_enabled", "bool", False,
        "Experimental: set up the bridge that turns epsilon or v-prediction outputs into flow-matching "
        "velocities.", status=PLANNED),
    opt("diff2flow_loss", "bool", False,
        "Compute the loss on the bridged flow velocity against noise minus latents, rather than on the "
        "model's native target. Needs diff2flow_enabled.", status=PLANNED),
    # Scheduled sampling (rollout)
    opt("scheduled_sampling_max_step_offset", "int", 0,
        "Upper bound on how many denoising steps the model rolls out on its own before a training step; "
        "0 disables scheduled sampling.", status=PLANNED),
    opt("scheduled_sampling_strategy", "str", "uniform",
        "How rollout lengths are drawn: evenly, favouring short ones, or favouring long ones.",
        choices=("uniform", "biased_early", "biased_late"), status=PLANNED),
    opt("scheduled_sampling_probability", "float", 0.0,
        "Chance (0-1) that a sample gets a non-zero rollout; 0 disables it even with a positive offset.",
        status=PLANNED),
    opt("scheduled_sampling_prob_start", "float", 0.0,
        "Rollout probability at the start of the ramp.", status=PLANNED),
    opt("scheduled_sampling_prob_end", "float", 0.5,
        "Rollout probability once the ramp is complete.", status=PLANNED),
    opt("scheduled_sampling_ramp_steps", "int", 0,
        "Steps over which the probability moves from prob_start to prob_end; 0 means no ramp.",
        status=PLANNED),
    opt("scheduled_sampling_start_step", "float", 0.0,
        "Global step at which the probability ramp begins.", status=PLANNED),
    opt("scheduled_sampling_ramp_shape", "str", "linear",
        "Curve followed by the probability ramp.", choices=("linear", "cosine"), status=PLANNED),
    opt("scheduled_sampling_sampler", "str", "unipc",
        "Solver that performs the rollout steps.", choices=("unipc", "euler", "dpm", "rk4"), status=PLANNED),
    opt("scheduled_sampling_order", "int", 2,
        "Order of the rollout solver.", status=PLANNED),
    opt("scheduled_sampling_reflexflow", "bool", None,
        "ReflexFlow anti-drift and frequency-compensated weighting during rollouts. Unset switches it on "
        "for flow-matching models whenever rollouts are active; false turns it off.", status=PLANNED),
    opt("scheduled_sampling_reflexflow_alpha", "float", 1.0,
        "Strength of ReflexFlow's exposure-bias loss reweighting.", status=PLANNED),
    opt("scheduled_sampling_reflexflow_beta1", "float", 10.0,
        "Weight of ReflexFlow's directional anti-drift regulariser.", status=PLANNED),
    opt("scheduled_sampling_reflexflow_beta2", "float", 1.0,
        "Weight of ReflexFlow's frequency-compensated loss term.", status=PLANNED),
]
