"""Images and data sets: the one image loader (training and serving), the dataset scan and
hash-stable split, memory-mapped stores, preprocessing, augmentation, SMOTE balancing, the
generated demo set and the data plots. Imports ``core`` only."""
