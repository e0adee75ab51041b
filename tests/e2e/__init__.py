"""The documents run as written: the README's blocks, its fleet recipes, the benchmark."""
