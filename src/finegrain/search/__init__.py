"""Search modes beyond plain global top-k (HiMIR multi-vector scoring)."""
