"""What every stage shares and nothing above it: errors, devices, image decoding, views, files, checkpoint I/O."""
