"""Reliability measurements: fault injection and soak runs whose figures go to results/reliability.md."""
