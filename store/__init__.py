"""Activation stores: sharded Zarr v3 groups of (rows x features) arrays, one per unit."""
