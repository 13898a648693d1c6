"""Measuring: metrics, evaluation of retrieval and duplicates, and the copies they use."""
