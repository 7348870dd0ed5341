"""`python -m mixquant.app.cli ...` (and `torchrun --nproc_per_node N -m mixquant.app.cli quantize ...`)."""
import sys

from . import main

sys.exit(main())
