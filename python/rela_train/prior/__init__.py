"""The prior: loaders (``loaders``), embedding a dataset into a store and fitting its transport
(``embedding``), the trainer's targets (``targets``) and the transportability diagnostic
(``transportability``)."""
