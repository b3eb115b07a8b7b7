"""Framework glue for ``balancer`` (DeepSpeed, DDP, FSDP2): each integration imports its framework
lazily and names the extra to install when it is missing. The local, single-process backend
lives in the core (:mod:`balancer.local`)."""
