"""llmm: Gaussian K-direction LoRA (MeMoTune / Llmm) over LoftQ-quantized backbones, as a PEFT LoRA variant."""

from llmm.run.quiet import install_import_filter

install_import_filter()  # before bitsandbytes loads: its CPU-kernel notice is logged at import time
from llmm.config import LlmmConfig  # noqa: E402
from llmm.layer import LlmmVariant, sample_factor
from llmm.model import (
    export_mean_adapter,
    get_llmm_model,
    init_from_adapter,
    llmm_layers,
    load_llmm_model,
    noise_mode,
    noise_source,
    save_llmm_adapter,
    seed_noise,
)
from llmm.predict import mc_predict

__all__ = [
    "LlmmConfig",
    "LlmmVariant",
    "export_mean_adapter",
    "get_llmm_model",
    "init_from_adapter",
    "llmm_layers",
    "load_llmm_model",
    "mc_predict",
    "noise_mode",
    "noise_source",
    "save_llmm_adapter",
    "sample_factor",
    "seed_noise",
]
__version__ = "0.1.0"
