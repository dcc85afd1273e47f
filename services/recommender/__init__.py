"""Recommender: top-K items for a user and context over a live catalog, with text cold start."""
