"""Development tooling: what tests, benchmarks and the local stack use and production does not."""
