"""rela_train: the reference BYOL + ReLA trainer built on rela_kernels.

Command line: ``rela-train`` (or ``python -m rela_train``); see ``rela_train.cli``.
"""

__all__: list[str] = []
