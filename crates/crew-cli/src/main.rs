//! The stock `crew` binary: [`crew_cli::App`] with the built-in classes.
//!
//! Built with `--cfg fuzzing` (`cargo xtask fuzz`), it is a libFuzzer
//! binary over the targets of crew-cli's `fuzz.rs` instead (their entry
//! point is in the library), with no `main` of its own.

#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
use crew_cli as _;

#[cfg(not(fuzzing))]
fn main() -> std::process::ExitCode {
    crew_cli::App::new().run()
}
