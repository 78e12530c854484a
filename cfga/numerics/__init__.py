"""The method's numerics as pure functions over tensors: mask, pooled features, the scalar, gradient → vector, metrics."""
