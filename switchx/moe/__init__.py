"""Mixture-of-Experts: routers (routing.py) and the sparse feed-forward layer (layer.py)."""
