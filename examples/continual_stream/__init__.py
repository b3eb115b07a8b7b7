"""The streams, methods and metrics of ``examples/online_continual.py`` (GSA's recipe, online)."""
