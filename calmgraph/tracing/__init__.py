"""What the trace pass uses: entry wrappers, front ends, tap finding, purity checks."""
