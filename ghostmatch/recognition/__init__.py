"""Recognition: labels on indexed photos, "what is this?" by a vote of the nearest labelled
photos with an open-set rejection threshold, and the ImageNet classifier's own answer."""
