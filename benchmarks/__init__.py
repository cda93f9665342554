"""Speed and memory benchmarks of kdjax: printed as tables and written as JSON, never asserted (see README.md)."""
