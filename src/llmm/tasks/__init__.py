"""Task families beyond the paper's: multiple-choice calibration (``llmm.tasks.mcq`` for the data, prompt and
answer letters; ``llmm.tasks.calibration`` for the answer distributions in mean / sample / Monte-Carlo /
MC-dropout / ensemble modes and their accuracy, ECE, NLL and Brier)."""
