"""The GPU benchmark harness and the seed recipe it is measured against (not part of the product)."""
