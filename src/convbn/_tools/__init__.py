"""Layer 4: measurement, benchmark, command line (public API only)."""
