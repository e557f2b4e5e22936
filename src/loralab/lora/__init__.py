"""The LoRA engine: pure, importable, no I/O beyond adapters.

    model = inject_lora(model, LoRAConfig(r=8, alpha=16, targets="attention"))
    save_adapter(model, "out/adapter", base_model_name_or_path="minilm")
    merged = merge_and_unload(model)
"""

from loralab.lora.adapters import (
    adapter_state_dict,
    has_adapters,
    load_adapter,
    merge_and_unload,
    read_adapter_config,
    save_adapter,
)
from loralab.lora.base import is_linear
from loralab.lora.inject import (
    ATTENTION,
    PRESETS,
    LoRAConfig,
    adapter_routing,
    default_modules_to_save,
    delete_adapter,
    disable_adapter,
    find_targets,
    inject_lora,
    linear_names,
    lora_shapes,
    set_active_adapter,
)
from loralab.lora.layer import LoRALinear, ModulesToSave, lora_delta, merge_weight
from loralab.lora.report import format_trainable, trainable_report

__all__ = [
    "ATTENTION", "PRESETS", "LoRAConfig", "LoRALinear", "ModulesToSave", "adapter_routing",
    "adapter_state_dict", "default_modules_to_save", "delete_adapter", "disable_adapter",
    "find_targets", "format_trainable", "has_adapters", "inject_lora", "is_linear",
    "linear_names", "load_adapter", "lora_delta", "lora_shapes", "merge_and_unload",
    "merge_weight", "read_adapter_config", "save_adapter", "set_active_adapter",
    "trainable_report",
]
