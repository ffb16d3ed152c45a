"""``python -m badam_kernels``: the ``badam-finetune`` command line."""
from .cli import main

raise SystemExit(main())
