"""Tools for developers: tiny offline checkpoints, real-size random checkpoints, the benchmark.
The app never imports these; the command line's make-tiny and bench commands do."""
