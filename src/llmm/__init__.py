"""llmm: Gaussian K-direction LoRA (MeMoTune / Llmm) over LoftQ-quantized backbones, as a PEFT LoRA variant."""

from llmm.run.quiet import install_import_filter

install_import_filter()  # before bitsandbytes loads: its CPU-kernel notice is logged at import time
from llmm.config import LlmmConfig  # noqa: E402
from llmm.layer import LlmmVariant, sample_factor
from llmm.model import (entropy, entropy_weight, export_mean_adapter, get_llmm_model, init_from_adapter, llmm_layers,
                        load_llmm_model, noise_mode, noise_source, noise_width, save_llmm_adapter, seed_noise)
from llmm.noise import NoiseSource, mc_streams
from llmm.predict import mc_letter_probs, mc_predict, mc_regress
from llmm.width import choose_noise_width

__all__ = [
    "LlmmConfig", "LlmmVariant", "NoiseSource", "choose_noise_width", "entropy", "entropy_weight",
    "export_mean_adapter", "get_llmm_model", "init_from_adapter", "llmm_layers", "load_llmm_model", "mc_letter_probs",
    "mc_predict", "mc_regress", "mc_streams", "noise_mode", "noise_source", "noise_width", "save_llmm_adapter",
    "sample_factor", "seed_noise",
]
__version__ = "0.1.0"
