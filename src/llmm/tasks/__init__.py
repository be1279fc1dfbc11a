"""Task families, one module each: the data, prompts and metrics a family's scripts share.

- ``llmm.tasks.glue``: GLUE (and the quick start's BBC News) for encoders: task registry, loaders, metrics.
- ``llmm.tasks.prompts``: the causal-LM prompts (GSM8K, Alpaca, HH-RLHF), loss masks and GSM8K answer extraction.
- ``llmm.tasks.mcq`` + ``llmm.tasks.calibration``: multiple-choice calibration (BLoB's protocol): the data, prompt
  and answer letters, and the answer distributions in mean / sample / Monte-Carlo / MC-dropout / ensemble modes
  with their accuracy, ECE, NLL and Brier."""
