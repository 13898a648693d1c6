"""Reading photos: finding files in folders and decoding them."""
