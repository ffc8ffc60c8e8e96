"""Dense building blocks: linear maps, embeddings, RMS norm, attention with relative position bias, MLPs."""
