//! The conformance kit: the public test suite every backend runs against
//! itself.
//!
//! crew's plugin traits ([`Store`](crate::store::Store) and
//! [`Worker`](crate::worker::Worker), whose kit is the `crew-conformance`
//! crate) carry contracts that types cannot
//! express: atomic uploads, `NotFound` for a missing key, segment-prefix
//! listing, idempotent deletes. Each contract is written once, here, as
//! executable checks, the way `object_store` runs one integration suite over
//! all its backends: every implementation, `crew-core`'s own and third
//! parties', proves itself by calling the kit from its tests.
//!
//! # Who runs it, and how
//! A backend crate enables the `conformance` feature of `crew-core` in its
//! `[dev-dependencies]` and calls one function per trait from an async test;
//! the function panics with a message naming the broken rule, like a failed
//! assertion:
//!
//! ```toml
//! [dev-dependencies]
//! crew-core = { version = "0.1", features = ["conformance"] }
//! ```
//!
//! ```ignore
//! #[tokio::test]
//! async fn conformance() {
//!     let store = MyStore::connect(/* a scratch bucket */).await.unwrap();
//!     crew_core::conformance::store(&store).await;
//! }
//! ```
//!
//! The kit writes only under a prefix unique to each run and removes what it
//! wrote, so it can run against a shared bucket and in parallel.
//!
//! The kit is compiled only for `crew-core`'s own tests and behind the
//! `conformance` feature, so production builds do not carry it.

pub mod store;

pub use self::store::store;
