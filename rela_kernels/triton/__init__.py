"""Triton kernels of the rela ops (``rela_kernels.triton.cosine_loss``, ``.score_select``).

Nothing is imported here on purpose: importing ``rela_kernels`` must never import triton, and
``TRITON_INTERPRET`` has to be set before the kernel module is first imported.
"""
