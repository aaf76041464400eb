//! Support for the end-to-end tests: the simulated host and helpers shared by the tests in `tests/e2e`.
