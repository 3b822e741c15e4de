//! crew-pipeline integration tests (the end-to-end ones drive the crew binary in crew-cli).
