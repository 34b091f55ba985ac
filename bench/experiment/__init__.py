"""Autoscaling experiments against a live Ray Serve deployment: scenario files (`scenario.py`),
the open-loop client and the deployment sampler (`runner.py`), results and plots (`report.py`),
and `llama4-ep experiment` (`cli.py`)."""
