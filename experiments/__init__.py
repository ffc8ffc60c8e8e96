"""Small-scale reproductions of the Switch Transformer results (run each script with --help)."""
