"""Pure planning: levels, blocks and routes, sparsity, and the request bill."""
