"""Dockerfile corpus for the builder's compatibility tests, and helpers shared by them."""
