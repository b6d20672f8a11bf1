"""The ReLA study on Fashion-MNIST (``benchmarks/study_rela.py``): grid, runner, aggregation.

``grid`` says which runs make up the study and what each costs; ``records`` reads and writes one
result per run; ``transport`` prepares the transported prior (data of other classes, and the
trained network as an RGB prior checkpoint); ``runner`` drives ``python -m rela_train`` for each
run; ``aggregate`` turns the records into a markdown table and a plot.
"""
