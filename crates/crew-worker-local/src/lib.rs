//! crew-worker-local
