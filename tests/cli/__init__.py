"""The command line as people and service managers run it, in real processes."""
