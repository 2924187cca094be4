"""FX graph passes of the `spattn` backend (graph analysis and rewriting only; no kernels here)."""
