"""The wire: the sans-IO state machine, the language-neutral contract, the fuzzer."""
