"""Refinements of instance retrieval beyond a plain cosine: descriptor whitening, query
augmentation, alpha-QE and DBA over a shortlist, and re-ranking by local features."""
