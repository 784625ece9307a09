"""Caches of encoder outputs: VAE latents per image and text embeddings per caption.

store.py writes tensor records to any Storage; vae.py and text.py decide what
goes in them and when an entry is stale.
"""
