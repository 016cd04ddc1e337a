"""Evaluation: tasks, data loaders, scorers, the runner and reports (``vtc eval``, ``vtc report``)."""
