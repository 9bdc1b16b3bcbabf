"""What tests and the demo serve: a small HTTP server on 127.0.0.1."""
