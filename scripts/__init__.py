"""Entry points, one per job: run from the repository root as `python -m scripts.<name> --help`."""
