//! Integration tests of the S3 store against the local emulator (moto,
//! started by `cargo xtask ci` or `cargo xtask emu start`): the store
//! conformance kit, a large multipart object, clear errors, and a proxy that
//! injects faults between the store and the emulator.
//!
//! Every test starts with `crew_store_s3::testing::endpoint`, which skips it
//! without an emulator (fails it in CI), and uses its own bucket.
//!
//! moto checks no credentials or signatures: refused credentials cannot be
//! tested here (the error mapping of 401/403 is covered by a unit test).

#![allow(clippy::unwrap_used)] // tests may unwrap

mod faults;
mod store;
mod support;
