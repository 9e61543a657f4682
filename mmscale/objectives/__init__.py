"""Losses, one family a file. Each takes (already gathered) embeddings and returns a scalar."""
