"""`python -m distillery_trainer` (e.g. `torchrun --nproc-per-node N -m distillery_trainer -f job.yaml`)."""

import sys

from distillery_trainer.cli import main

sys.exit(main())
