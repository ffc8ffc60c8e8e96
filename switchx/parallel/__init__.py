"""Parallelism: the mesh (mesh.py), logical -> mesh axis rules (rules.py), and the partitioner that turns them
into shardings for parameters, optimizer state and batches, validated before anything compiles
(partitioning.py)."""
