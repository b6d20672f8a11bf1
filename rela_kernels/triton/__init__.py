"""Triton kernels of the rela ops (see ``rela_kernels.triton.cosine_loss``).

Nothing is imported here on purpose: importing ``rela_kernels`` must never import triton, and
``TRITON_INTERPRET`` has to be set before the kernel module is first imported.
"""
