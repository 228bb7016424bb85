"""The `ms4local` command line: one module per command, shared options and the error table."""
