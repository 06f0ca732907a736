"""One module per CLI command (a click command named ``command``), registered in :mod:`lorasurgery.cli`."""
