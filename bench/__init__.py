"""`make bench`: generated workloads W1-W4 against the naive loop, the GEMM rate and a peer."""
