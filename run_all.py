"""Run the whole pipeline for one hardware profile: `python run_all.py --profile cpu` (see --help)."""

import sys

from synthetic_instruction_tuner.orchestrator import main

if __name__ == "__main__":
    sys.exit(main())
