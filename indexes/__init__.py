"""FAISS index layer of ghostmatch."""
