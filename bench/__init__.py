"""para_kernels benchmark suite: ``python -m bench`` (``make bench``)."""
