"""Entry points, one per job: run from the repository root as `python -m scripts.<name> --help`."""

from scripts import quiet

quiet.install()  # before any library loads: bitsandbytes logs at import time
