"""The run layer: what the entry points in scripts/ share (settings, the run skeleton, the Trainer, files, errors).

    schema       every setting as a typed field; a family's Settings class
    recipe       the run skeleton (Recipe) and the run's saved adapters
    trainer      LlmmTrainer: one noise stream per process, divergence guard, resume checks
    cli          run_main (one ``error:`` line per bad input), logging, generated flags; quiet: log filters
    fileio       atomic writes, checks of model and data paths, loading, plots
    tables       the YAML tables of configs/;  adapters: settings -> LlmmConfig, _init.sh directories
    causal_lm    GSM8K / Alpaca / HH-RLHF training;  gsm8k_test, lm_report: their test and table
    glue         GLUE training;  glue_eval, glue_report: its re-scoring and table
    mcq          multiple-choice calibration;  mcq_test, mcq_report: its evaluations, ensembles and table
    quantize     _init.sh (LoftQ backbone + init adapter);  quickstart: the offline quick start
    width_search the noise-width search after training
"""
