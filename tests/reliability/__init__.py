"""Issue 8: the fault catalogue, overload, the load/evict storm, fuzzing and security."""
