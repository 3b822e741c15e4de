//! Integration tests of crew: the real `crew` binary, real agent processes,
//! real sockets and real signals; no mocks.
//!
//! Every test that starts processes marks them (an environment variable or
//! a unique argument), waits with a deadline, and kills whatever carries its
//! mark when it ends, so that a failing test leaves nothing behind.

mod aws_batch;
mod aws_batch_definition;
mod bounds;
mod cli;
mod config;
mod controller;
mod daemon_api;
mod daemon_limits;
mod daemon_scale;
mod dashboard;
mod durability;
mod environment;
mod limits;
mod mixed;
mod pipeline;
mod plugins;
mod restart;
mod run;
mod s3;
mod s3_faults;
mod session;
mod staging;
mod support;
mod tls;
mod warden;
