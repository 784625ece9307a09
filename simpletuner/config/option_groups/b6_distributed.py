"""Sharded training: FSDP2 (accelerate's FullyShardedDataParallelPlugin) and context parallelism."""

from simpletuner.config.option_types import BUILT, PLANNED, opt

GROUP = "Sharded training (FSDP2)"

WRAP_POLICIES = ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP")


def _upper(value: str) -> str:
    """Flag spelling is forgiving: transformer_based_wrap and full_state_dict are accepted too."""
    return str(value).strip().upper()


OPTIONS = [
    opt("fsdp_enable", "bool", False,
        "Shard the trained model, its gradients and optimizer state across the processes with PyTorch FSDP "
        "(model_type=full only). Same as --use_fsdp in ACCELERATE_EXTRA_ARGS or distributed_type: FSDP in an "
        "accelerate config file.", status=BUILT),
    opt("fsdp_version", "int", 2,
        "FSDP implementation: 2 (DTensor-based fully_shard) or the deprecated 1.",
        choices=(1, 2), planned_choices=(1,),
        unbuilt_reason="FSDP v1 is deprecated and only FSDP2 is built.", status=BUILT),
    opt("fsdp_reshard_after_forward", "bool", True,
        "Free each block's gathered weights after its forward pass (less memory, one more all-gather in the "
        "backward pass).", status=BUILT),
    opt("fsdp_state_dict_type", "str", "SHARDED_STATE_DICT",
        "Checkpoint format under FSDP: every rank writes its own shard (SHARDED_STATE_DICT), or rank 0 gathers "
        "the whole model and optimizer state into one file (FULL_STATE_DICT). The final model is always "
        "gathered and saved whole.",
        choices=("SHARDED_STATE_DICT", "FULL_STATE_DICT"), parse=_upper, status=BUILT),
    opt("fsdp_cpu_ram_efficient_loading", "bool", False,
        "Load the base weights on rank 0 only and broadcast them, to flatten host memory spikes.",
        unbuilt_reason="Every rank still loads the whole model from disk before sharding, so enabling it would "
                       "save no host memory.", status=PLANNED),
    opt("fsdp_auto_wrap_policy", "str", "TRANSFORMER_BASED_WRAP",
        "Which submodules become their own FSDP unit: the classes in fsdp_transformer_layer_cls_to_wrap (by "
        "default the model's _no_split_modules), every module above a parameter count, or only the whole model.",
        choices=WRAP_POLICIES, parse=_upper, status=BUILT),
    opt("fsdp_transformer_layer_cls_to_wrap", "str", None,
        "Comma-separated module class names wrapped as FSDP units under TRANSFORMER_BASED_WRAP, e.g. "
        "BasicTransformerBlock,ResnetBlock2D; unset uses the model's _no_split_modules.", status=BUILT),
    opt("context_parallel_size", "int", 1,
        "Split the sequence dimension of attention across this many ranks (needs FSDP2 on CUDA).",
        unbuilt_reason="Context parallelism is not built.", status=PLANNED),
    opt("context_parallel_comm_strategy", "str", "allgather",
        "How context-parallel ranks exchange keys and values.", choices=("allgather", "alltoall"),
        unbuilt_reason="Context parallelism is not built.", status=PLANNED),
]
