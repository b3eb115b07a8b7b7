"""The pieces of ``examples/experiments/dpo_imbalance.py``: the two DPO settings, training, reporting.

``discrete``: a log-linear policy over a finite response space, exact metrics, the ideal policy
``π* ∝ π_ref · exp(r*/β)`` and the best reward reachable at each KL. ``autoregressive``: a tiny GRU
language model. ``training``: one method's run and the matched-KL comparison. ``report``: mean ± sd,
paired differences, tables and the figure.
"""
