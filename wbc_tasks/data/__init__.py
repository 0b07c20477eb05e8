"""Images and data sets: the one image loader (training and serving), the labelled folder's
layout and scan, the hash-stable split, memory-mapped stores, preprocessing, per-image
transforms (geometry, stain jitter) and the augmentation of whole stores, SMOTE balancing, the
generated demo set and the data plots."""
