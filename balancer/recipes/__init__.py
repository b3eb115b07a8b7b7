"""Ready-made loss arrangements for the seed papers' settings, built on the public API only.

- :mod:`~balancer.recipes.dpo`: DPO's chosen/rejected split of the gradient, sequence log-probs.
- :mod:`~balancer.recipes.continual`: a reservoir replay buffer and the logit mask of online
  continual learning.
- :mod:`~balancer.recipes.split_half`: ``SplitHalf``, unbiased per-task squared gradient norms
  from groups captured in two halves.
"""
