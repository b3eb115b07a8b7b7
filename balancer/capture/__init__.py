"""How a step's group gradients (or their statistics) are captured, before any plugin runs.

- :mod:`~balancer.capture.flat_buffer`: one ``[1 + k, n]`` tensor per (device, dtype); row 0 is
  the ungrouped gradient (``.grad`` views), row ``1 + i`` group ``i``; Gram matrix and combine,
  with the tiled products and their float64 refinement in :mod:`~balancer.capture.row_gram`.
- :mod:`~balancer.capture.local`: ``LocalBackend``, the flat buffers of one process (DDP and
  FSDP2 extend it in ``balancer.integrations``).
- :mod:`~balancer.capture.layer_capture`: ``backward_samples``/``backward_tasks``: per-layer Gram
  matrices from the layer inputs ``X`` and output gradients ``Δ`` (``nn.Linear`` only), with its
  arithmetic in :mod:`~balancer.capture.layer_gram` and the autograd-graph recognition (private
  torch node names) in :mod:`~balancer.capture.autograd_nodes`.
- :mod:`~balancer.capture.source`: ``CaptureSource``, what a step reads and writes of its groups,
  whether they come from a backend's rows or from the layer capture.
- :mod:`~balancer.capture.rows`: ``opt.backward_rows(loss, at=..., group=rows)``: exact group
  gradients when the groups are rows of one forward pass of any model.
- :mod:`~balancer.capture.taps`: ``opt.tap(tensor, group=...)``, gradients shown to plugins
  inside the backward pass.
"""
