"""The Simple-BEV family segmentation network."""
