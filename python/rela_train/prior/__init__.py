"""The prior: everything between a frozen model and ReLA-D's regression targets.

- ``loaders``: a prior by its spec string (``pixels:16``, ``random:resnet18``, ``torchscript:PATH``,
  ``embeddings:PATH`` ...): the model, its preprocessing and output width.
- ``embedding``: running a prior over a dataset into an EmbeddingStore (the ``embed`` command, and
  in-memory datasets for the trainer) and fitting the store's transport; the one chunk loop and the
  one transport-width rule.
- ``targets``: what the trainer uses: the training set's store and transport, opened or computed
  once per run (``prepare_prior``), indexed per batch (``PriorTargets``).
- ``transportability``: the held-out R^2 diagnostic of a linear map from one store to another.
"""
