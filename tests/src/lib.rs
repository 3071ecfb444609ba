//! End-to-end test package: see the files under `tests/tests/`.
