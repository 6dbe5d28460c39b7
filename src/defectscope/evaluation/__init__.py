"""Metrics per task, plots and the HTML report."""
