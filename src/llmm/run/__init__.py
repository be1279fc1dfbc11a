"""The run layer: what the entry points in scripts/ share (settings, the run skeleton, the Trainer, files, errors).

    cli        run_main (one ``error:`` line per bad input), logging, log filters (quiet)
    fileio     atomic writes, checks of model and data paths, loading, plots
    tables     the YAML tables of configs/
    adapters   settings -> LlmmConfig, _init.sh directories
    trainer    LlmmTrainer: one noise stream per process, divergence guard, resume checks
    causal_lm  causal-LM backbone, adapter and data
"""
