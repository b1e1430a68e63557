"""The embedded demo: synthetic scenes with VOC masks, and the demo teacher trained on them."""
