"""The descriptor model: GhostNet, the GeM head, the model card, weights and their download,
the embedder and the score background."""
