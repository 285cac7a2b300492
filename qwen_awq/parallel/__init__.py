"""Tensor and data parallelism: parallel state, weight sharding, tensor-parallel workers, engine replicas."""
