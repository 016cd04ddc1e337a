"""Evaluation: tasks, runner, scoring, reports."""
