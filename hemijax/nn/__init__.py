"""Building blocks every method shares: convolution lowerings, layers, fusion, modality dropout, losses (pure, no I/O)."""
