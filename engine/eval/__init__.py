"""Measuring methods: the evaluation's numbers, the report, the metrics."""
