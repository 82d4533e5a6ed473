"""`python -m qlora ...`, which is also what `torchrun --nproc-per-node N -m qlora finetune ...` runs."""
import sys

from qlora.cli import main

sys.exit(main())
