"""Training the bundled model: the loop, its augmentations and image transforms."""
