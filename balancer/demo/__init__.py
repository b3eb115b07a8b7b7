"""``balancer demo``: multi-task GRPO on a toy language model, with and without balancing.

- :mod:`~balancer.demo.tasks`: the toy tasks and their vocabulary;
- :mod:`~balancer.demo.grpo`: the GRPO training loop on the Balancer;
- :mod:`~balancer.demo.mt_grpo`: MT-GRPO's ratio-preserving sampler and the feedback to its plugin;
- :mod:`~balancer.demo.summary`: the comparison printed at the end;
- :mod:`~balancer.demo.run`: ``run_demo``, what the CLI calls;
- :mod:`~balancer.demo.compare`: every method over several seeds (``python -m balancer.demo.compare``).
"""
