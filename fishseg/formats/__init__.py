"""The files fishseg writes: the HDF5 feature cache and run, cross-validation and sweep folders."""
