"""Data: devkit-backed index, dataset, augmentation, targets, point clouds."""
