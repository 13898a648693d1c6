"""What an index keeps: the catalog of images and vectors, and the writer lock."""
