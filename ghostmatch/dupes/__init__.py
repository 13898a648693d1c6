"""Duplicates: grouping, geometric verification, actions on files and the HTML report."""
