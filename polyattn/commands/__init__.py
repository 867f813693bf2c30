"""One module per CLI subcommand: argument parsing and printing only, the work is done elsewhere."""
