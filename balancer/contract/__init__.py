"""What a plugin or backend author programs against.

- :mod:`~balancer.contract.plugin`: ``Plugin``, ``PluginOptions``, ``State``: a plugin turns
  :class:`~balancer.contract.stats.GroupStats` (and its own state) into weights, or rescales a
  tapped gradient (:class:`~balancer.contract.tap_event.TapEvent`).
- :mod:`~balancer.contract.backend`: ``Backend``, where group gradients live (local tensors,
  DDP, FSDP2 shards, DeepSpeed partitions) and how their statistics are reduced.
- :mod:`~balancer.contract.hookspecs` and :mod:`~balancer.contract.registry`: how plugins and
  backends are found (pluggy entry points in the group ``balancer``).
- :mod:`~balancer.contract.testing`: ``check_plugin``, the conformance suite for plugin authors.
"""
