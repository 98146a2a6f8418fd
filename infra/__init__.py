"""Local infrastructure helpers (local S3 + Ray head) shared by `make demo` and the end-to-end tests."""
