"""One step, after capture: statistics, plugin weights, clip, combine, inner step (internal).

- :mod:`~balancer.step.pending`: ``PendingStep``, what has been captured for the next step
  (group rows or the layer capture, taps, losses), cleared in one place;
- :mod:`~balancer.step.plan`: the step planned without writing anything (Gram matrix, the one
  host sync of :mod:`~balancer.step.verdict`, the plugins' chain, the clip of :mod:`~balancer.step.clip`);
- :mod:`~balancer.step.run`: the plan applied and committed only if the inner step succeeds;
- :mod:`~balancer.step.notices`: the refusals and warnings of a step that would balance nothing.
"""
