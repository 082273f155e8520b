"""Data: synthetic nuScenes generator, devkit-backed index, dataset, augmentation, targets."""
