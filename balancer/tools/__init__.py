"""The command line (``balancer``), the metrics log and its report."""
