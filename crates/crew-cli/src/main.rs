//! The stock `crew` binary: [`crew_cli::App`] with the built-in classes.
//!
//! Built with `--cfg fuzzing` (`cargo xtask fuzz`), it is a libFuzzer
//! binary over the targets of crew-cli's `fuzz.rs` instead, with no `main`
//! of its own.

#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(init: crew_cli::fuzz::write_seeds(), |data: &[u8]| crew_cli::fuzz::entry(data));

#[cfg(not(fuzzing))]
fn main() -> std::process::ExitCode {
    crew_cli::App::new().run()
}
