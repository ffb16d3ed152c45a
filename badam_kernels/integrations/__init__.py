"""Integrations with training frameworks, kept apart from the optimizer and the kernels.

* :mod:`badam_kernels.integrations.hf`: Hugging Face ``transformers.Trainer`` (``BAdamTrainer``,
  ``make_badam_optimizer``, ``BAdamConfig``); Accelerate's ``prepare`` works on the optimizer it builds.

Importing this package does not import ``transformers``; ``from badam_kernels.integrations.hf import ...`` does.
"""

__all__ = ["hf"]
