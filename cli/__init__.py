"""The ghostmatch command line."""
