"""The model layer: loading, the forward path, attention kernels, activation capture, the reference cache, the layout rule."""
