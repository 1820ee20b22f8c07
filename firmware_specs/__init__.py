"""What vehicle firmware teams implement: the signal catalogue, wire specs and test vectors.

This package holds data only (shipped as package data); `protocol` locates it through importlib.resources.
"""
