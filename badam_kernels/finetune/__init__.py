"""The main job, ``badam-finetune``: fine-tune a model folder (or the embedded tiny Llama) with BAdam.

``config`` (the options and their checks), ``data`` (JSONL pairs or text into batches), ``model``
(loading), ``checkpoint`` (run folder, checkpoints, resume), ``launch`` (one process or a torchrun
job), ``loop`` (build the run, run it, finish it), ``cli`` (the command line), ``plots``. It uses
the core (``badam_kernels``) and the optional packages of the ``finetune`` extra
(``pip install badam-kernels[finetune]``: transformers, safetensors, tqdm, matplotlib); the core
imports nothing from here.
"""
