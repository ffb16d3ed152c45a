"""``python -m badam_kernels``: the ``badam-finetune`` command line."""
from .finetune.cli import main

raise SystemExit(main())
