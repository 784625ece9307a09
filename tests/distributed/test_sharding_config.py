"""FSDP / DeepSpeed without starting processes: settings -> accelerate plugins, DeepSpeed config completion,
the optimizer DeepSpeed expects, refusals, and the checkpoint pieces the ranks write."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from simpletuner.config.errors import ConfigError
from simpletuner.config.settings import Settings
from simpletuner.training import checkpoints, sharding
from simpletuner.training.deepspeed_zero import DeepSpeedZero, complete_config, config_problems

TWO_PROCESSES = {"WORLD_SIZE": "2"}


def settings(**values) -> Settings:
    return Settings({"model_type": "full", "optimizer": "optimi-adamw", "learning_rate": 1e-4, **values})


# --- FSDP ---------------------------------------------------------------------------------------
def test_fsdp_enable_builds_the_plugin_from_the_fsdp_options():
    plugin = sharding.fsdp_plugin(settings(fsdp_enable=True, fsdp_state_dict_type="full_state_dict",
                                           fsdp_reshard_after_forward=False,
                                           fsdp_transformer_layer_cls_to_wrap="BasicTransformerBlock, ResnetBlock2D"))
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is False
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert plugin.transformer_cls_names_to_wrap == ["BasicTransformerBlock", "ResnetBlock2D"]


def test_options_set_explicitly_override_what_accelerate_launch_set_up(monkeypatch):
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT")
    assert sharding.fsdp_plugin(settings()).state_dict_type.name == "FULL_STATE_DICT"  # from the launch flags
    chosen = sharding.fsdp_plugin(settings(fsdp_state_dict_type="SHARDED_STATE_DICT"))
    assert chosen.state_dict_type.name == "SHARDED_STATE_DICT"


def test_fsdp_v1_from_the_launch_flags_is_refused_naming_the_fix(monkeypatch):
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError) as caught:
        sharding.fsdp_plugin(settings())
    assert caught.value.key == "fsdp_version" and "--fsdp_version 2" in str(caught.value)


def test_requests_come_from_fsdp_enable_or_accelerates_environment():
    assert sharding.requested_kind(settings(), {}) is None
    assert sharding.requested_kind(settings(fsdp_enable=True), {}) == "FSDP"
    assert sharding.requested_kind(settings(), {"ACCELERATE_USE_DEEPSPEED": "true"}) == "DeepSpeed"
    with pytest.raises(ConfigError, match="cannot be enabled simultaneously"):
        sharding.requested_kind(settings(fsdp_enable=True), {"ACCELERATE_USE_DEEPSPEED": "true"})


def test_fsdp_with_lora_is_refused_naming_the_fix():
    with pytest.raises(ConfigError) as caught:
        sharding.refuse_unsupported("FSDP", settings(model_type="lora", fsdp_enable=True), TWO_PROCESSES)
    message = str(caught.value)
    assert caught.value.key == "fsdp_enable" and "model_type=lora" in message
    assert "Set model_type=full, or drop fsdp_enable" in message


def test_unsharded_features_and_a_single_process_are_refused():
    with pytest.raises(ConfigError) as caught:
        sharding.refuse_unsupported("FSDP", settings(use_ema=True, optimizer="soap"), {})
    message = str(caught.value)
    assert "use_ema is not implemented with FSDP" in message and "optimizer=soap" in message
    assert "set num_processes to 2 or more" in message
    sharding.refuse_unsupported("FSDP", settings(fsdp_enable=True), TWO_PROCESSES)  # a full model: fine


def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=2)


def test_the_final_model_is_rebuilt_from_the_gathered_state():
    unet = tiny_unet()
    copy = sharding.plain_copy(type(unet), unet.config, {k: v.clone() for k, v in unet.state_dict().items()})
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), unet.state_dict().values()))
    assert not any(p.is_meta for p in copy.parameters())


def test_validation_that_would_run_the_sharded_model_on_rank_0_alone_is_refused():
    from simpletuner.training.callbacks import CallbackList
    from simpletuner.validation.callback import build_validation_callback

    chosen = settings(model_family="sdxl", validation_prompt="a red circle", eval_loss_disable=True)
    trainer = SimpleNamespace(settings=chosen, data=None)
    strategy = sharding.Fsdp2(accelerator=None, settings=chosen)
    with pytest.raises(ConfigError) as caught:
        strategy.check_callbacks(CallbackList([build_validation_callback(chosen)]), trainer)
    assert caught.value.key == "validation_disable" and "set validation_disable=true" in str(caught.value)
    quiet = chosen.replace(validation_disable=True)
    strategy.check_callbacks(CallbackList([build_validation_callback(quiet)]), SimpleNamespace(settings=quiet))


def test_a_wrap_class_the_model_lacks_is_named_before_sharding():
    plugin = SimpleNamespace(transformer_cls_names_to_wrap=["BasicTransformerBlock", "FluxTransformerBlock"])
    strategy = sharding.Fsdp2(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)), settings())
    with pytest.raises(ConfigError) as caught:
        strategy.prepare(tiny_unet(), None, None)
    message = str(caught.value)
    assert "names FluxTransformerBlock, which UNet2DConditionModel does not contain" in message
    assert "BasicTransformerBlock" in message.split("include")[1]


# --- DeepSpeed ------------------------------------------------------------------------------------
def deepspeed_config(**plugin_args) -> dict:
    from accelerate.utils import DeepSpeedPlugin

    return DeepSpeedPlugin(gradient_accumulation_steps=1, **plugin_args).deepspeed_config


def test_deepspeed_config_is_completed_from_the_settings():
    config = deepspeed_config(zero_stage=3, offload_param_device="nvme")
    chosen = settings(train_batch_size=3, max_grad_norm=0.5, grad_clip_method="norm", offload_param_path="/nvme")
    assert config_problems(config, chosen) == []
    complete_config(config, chosen)
    assert config["train_micro_batch_size_per_gpu"] == 3 and config["gradient_clipping"] == 0.5
    zero = config["zero_optimization"]
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # so the final model can be gathered
    assert zero["offload_param"]["nvme_path"] == "/nvme"


@pytest.mark.parametrize("plugin_args, values, expected", [
    ({"zero_stage": 2}, {"max_grad_norm": 1.0, "grad_clip_method": "value"}, "set grad_clip_method=norm"),
    ({"zero_stage": 2, "offload_optimizer_device": "cpu"}, {"max_grad_norm": 0}, "add an 'optimizer' section"),
    ({"zero_stage": 2}, {"max_grad_norm": 0, "gradient_accumulation_steps": 4}, "gradient_accumulation_steps=1"),
    ({"zero_stage": 2}, {"max_grad_norm": 0, "offload_param_path": "/nvme"}, "remove it"),
])
def test_deepspeed_config_conflicts_are_named(plugin_args, values, expected):
    problems = config_problems(deepspeed_config(**plugin_args), settings(**values))
    assert len(problems) == 1 and expected in problems[0]


def fake_deepspeed_accelerator(config: dict):
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))


def test_deepspeed_builds_the_optimizer_its_config_names_and_runs_our_schedule_inside():
    from accelerate.utils.deepspeed import DummyOptim, DummyScheduler

    config = {**deepspeed_config(zero_stage=2), "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
    strategy = DeepSpeedZero(fake_deepspeed_accelerator(config), settings(max_grad_norm=0, lr_scheduler="constant"))
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer, scheduler = strategy.build_optimization([{"params": [weight], "lr": 1e-4}], 1e-4, 10)
    assert isinstance(optimizer, DummyOptim) and optimizer.lr == 1e-4
    assert isinstance(scheduler, DummyScheduler) and scheduler.total_num_steps == 10
    built = scheduler.lr_scheduler_callable(torch.optim.SGD([weight], lr=1e-4))  # what DeepSpeed would call
    assert built.get_last_lr() == [1e-4]


def test_deepspeed_without_an_optimizer_section_gets_our_optimizer_as_a_client_optimizer():
    strategy = DeepSpeedZero(fake_deepspeed_accelerator(deepspeed_config(zero_stage=1)), settings(max_grad_norm=0))
    optimizer, scheduler = strategy.build_optimization([{"params": [torch.nn.Parameter(torch.zeros(2))],
                                                         "lr": 1e-4}], 1e-4, 10)
    assert isinstance(optimizer, torch.optim.Optimizer) and hasattr(scheduler, "step")


# --- checkpoint pieces ------------------------------------------------------------------------------
def test_files_other_ranks_wrote_join_the_manifest_and_are_checked_on_load(tmp_path):
    folder = checkpoints.new_work_folder(str(tmp_path), 5)
    (tmp_path / folder / "fsdp").mkdir()
    (tmp_path / folder / "fsdp" / "shard.distcp").write_bytes(b"0123")
    written = checkpoints.write_state_files(folder, {"rng-rank1": checkpoints.capture_rng_state()})
    written["fsdp"] = checkpoints.folder_entry(folder, "fsdp")
    path = checkpoints.save_checkpoint(str(tmp_path), 5, 1, {"training_state": {"global_step": 5}}, {},
                                       work_folder=folder, written=written)
    state, manifest = checkpoints.load_checkpoint(path)
    assert state["fsdp"] == f"{path}/fsdp" and "python" in state["rng-rank1"]
    assert manifest["files"]["fsdp"]["bytes"] == 4
    (tmp_path / "checkpoint-5" / "fsdp" / "shard.distcp").write_bytes(b"01")
    with pytest.raises(ValueError, match="damaged"):
        checkpoints.load_checkpoint(path)


def test_a_checkpoint_resumes_only_with_the_sharding_it_was_written_with():
    from simpletuner.training.run_state import config_summary

    chosen = settings()
    assert checkpoints.config_differences(config_summary(chosen), config_summary(chosen)) == []
    differences = checkpoints.config_differences(config_summary(chosen, "FSDP"), config_summary(chosen))
    assert differences == ["sharding: saved 'FSDP', now unset"]
