//! Fuzz targets: the parsers that take outside input.
//!
//! Role: one entry point per target, shared by the coverage-guided fuzzer
//! (libFuzzer, built by `cargo xtask fuzz` into a `crew` binary compiled
//! with `--cfg fuzzing`, which then has no `main` of its own) and by the
//! bounded runs of the unit tests below (the seeds plus pseudo-random
//! mutations of them, deterministic, on every `cargo test`). Each target
//! must return for any bytes: an error is a refused input, a panic or a hang
//! is a bug. Why here and not in a `fuzz/` crate: two of the targets (the
//! API's request handling, the config loader) are private to this binary.
//!
//! The targets:
//! - `frame`: [`crew_core::protocol::decode`] over a byte stream, both
//!   directions; a decoded message re-encodes and decodes to the same bytes.
//! - `job_line`: a job file ([`crew_core::job::parse_job_file`], which
//!   parses each line with [`crew_core::job::parse_job_line`]), and the
//!   whole text as one line.
//! - `journal`: [`crew_controller::journal::Replay::from_bytes`]; the records of
//!   the state it rebuilds (what compaction writes) replay with nothing
//!   skipped.
//! - `api`: `daemon::check_request` (route, query, body, field checks); the
//!   first bytes choose the method and path.
//! - `config`: `crew.toml` text through `config::Config::parse`.

use bytes::BytesMut;
use crew_controller::journal::Replay;
use crew_core::job::{LineDefaults, parse_job_file, parse_job_line};
use crew_core::protocol::{AgentMsg, ControllerMsg, Frame, decode, encode};
use serde::Serialize;

/// The names of the targets, for `cargo xtask fuzz`.
pub(crate) const TARGETS: &[&str] = &["frame", "job_line", "journal", "api", "config"];

/// Runs target `name` on `data`; false for an unknown name.
pub(crate) fn run(name: &str, data: &[u8]) -> bool {
    match name {
        "frame" => frame(data),
        "job_line" => job_line(data),
        "journal" => journal(data),
        "api" => api(data),
        "config" => config(data),
        _ => return false,
    }
    true
}

fn frame(data: &[u8]) {
    frames::<AgentMsg>(data);
    frames::<ControllerMsg>(data);
}

/// Decodes every whole frame of `data` as `T`; each message must survive a
/// round trip byte for byte.
fn frames<T: Serialize + Frame>(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(msg)) = decode::<T>(&mut buf) {
        let mut once = BytesMut::new();
        if encode(&msg, &mut once).is_err() {
            // Over MAX_FRAME once re-encoded (a map written shorter than
            // its input, say): refused on the way out, as it must be.
            continue;
        }
        let again: T = match decode(&mut once.clone()) {
            Ok(Some(m)) => m,
            other => panic!("a message that decoded does not decode after encoding: {:?}", other.err()),
        };
        let mut twice = BytesMut::new();
        assert!(encode(&again, &mut twice).is_ok(), "a re-decoded message does not encode");
        assert_eq!(once, twice, "encoding is not stable across a round trip");
    }
}

/// The file parser already runs [`parse_job_line`] on each of its lines;
/// the whole text once more as one line adds what the file parser never
/// passes it (a comment, surrounding blanks, a JSON object over several
/// lines) at the cost of one job, where parsing every line a second time
/// doubled the cost of the long many-line inputs the fuzzer grows.
fn job_line(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let defaults = LineDefaults::default();
    let _ = parse_job_file(text, &defaults);
    let _ = parse_job_line(text, &defaults);
}

fn journal(data: &[u8]) {
    let replay = Replay::from_bytes(data);
    let mut text = Vec::new();
    for record in replay.records() {
        if serde_json::to_writer(&mut text, &record).is_ok() {
            text.push(b'\n');
        }
    }
    let again = Replay::from_bytes(&text);
    assert!(again.skipped.is_empty(), "a compacted journal has damaged lines: {:?}", again.skipped);
    assert_eq!(again.pending.len(), replay.pending.len(), "compaction changed the pending jobs");
    assert_eq!(again.ready.len(), replay.ready.len(), "compaction changed the ready outputs");
    assert_eq!(again.next_job, replay.next_job, "compaction changed the next job id");
}

fn api(data: &[u8]) {
    use hyper::Method;
    let (head, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Some((&m, target)) = head.split_first() else { return };
    let method = if m % 2 == 0 { Method::GET } else { Method::POST };
    let target = String::from_utf8_lossy(target);
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let _ = crate::daemon::check_request(&method, path, query, body);
}

fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = crate::config::Config::parse(std::path::Path::new("crew.toml"), text);
}

/// The libFuzzer entry (called by the `crew` binary's `fuzz_target!`
/// under `--cfg fuzzing`): the target named by `CREW_FUZZ_TARGET`. That
/// `fuzz_target!`'s `init` is [`write_seeds`].
#[cfg(fuzzing)]
pub fn entry(data: &[u8]) {
    static TARGET: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let name = TARGET.get_or_init(|| std::env::var("CREW_FUZZ_TARGET").unwrap_or_default());
    if !run(name, data) {
        eprintln!("CREW_FUZZ_TARGET must be one of {}", TARGETS.join(", "));
        std::process::abort();
    }
}

/// Writes the seeds of `CREW_FUZZ_TARGET` as `seed-N` files into the
/// folder `CREW_FUZZ_SEEDS`, keeping files already there (libFuzzer reads
/// the corpus after this runs).
#[cfg(fuzzing)]
pub fn write_seeds() {
    let (Ok(name), Some(dir)) = (std::env::var("CREW_FUZZ_TARGET"), std::env::var_os("CREW_FUZZ_SEEDS")) else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    for (i, seed) in seeds(&name).iter().enumerate() {
        let path = dir.join(format!("seed-{i}"));
        if !path.exists() {
            if let Err(e) = std::fs::write(&path, seed) {
                eprintln!("cannot write the seed {}: {e}", path.display());
            }
        }
    }
}

/// Seeds for each target (also written as the fuzzer's starting corpus by
/// `cargo xtask fuzz`).
#[cfg_attr(fuzzing, allow(dead_code))]
pub(crate) fn seeds(name: &str) -> Vec<Vec<u8>> {
    let text: &[&str] = match name {
        "job_line" => &[
            "echo hello\n",
            r#"{"cmd": ["sh", "-c", "echo $X"], "env": {"X": "1"}, "name": "a", "tags": ["gpu"], "timeout": "5s"}"#,
            r#"{"argv": ["true"], "cpu": "10m", "memory": "2GiB", "retries": 2, "inputs": [{"name": "f", "path": "/x"}]}"#,
            "# comment\n\nsleep 1\n",
        ],
        "journal" => &[
            "{\"t\":\"next_job\",\"next\":3}\n",
            "{\"t\":\"accepted\",\"jobs\":[[1,{\"command\":{\"argv\":[\"true\"]}}]]}\n{\"t\":\"assigned\",\"job\":1,\"attempt\":1}\n",
            "{\"t\":\"cancel\",\"ids\":[1,2]}\n{\"t\":\"withdrawn\",\"ids\":[2]}\n{\"t\":\"received\",\"ids\":[1]}\ntorn",
        ],
        "api" => &[
            "\x01/v1/jobs\n{\"jobs\": [\"echo hi\", {\"cmd\": [\"true\"], \"timeout\": \"1s\"}]}",
            "\x01/v1/recruit\n{\"class\": \"local\", \"workers\": 2, \"idle\": \"30s\", \"tags\": [\"a\"]}",
            "\x01/v1/receive\n{\"wait\": true, \"timeout\": 5, \"ids\": [1]}",
            "\x00/v1/sendable?tags=a%2Cb+c",
            "\x00/v1/jobs/x%41/objects",
            "\x00/v1/jobs/12/logs",
            "\x01/v1/cancel\n{\"ids\": [1, 2]}",
        ],
        "config" => &[
            "[daemon]\nlisten = \"127.0.0.1:0\"\nheartbeat = \"5s\"\njournal_compact = \"64MiB\"\nseed = 7\n",
            "[recruit]\nidle = \"1m\"\ntasks_max = 3\n[class.local]\ncores = \"2\"\n",
        ],
        _ => &[],
    };
    let mut out: Vec<Vec<u8>> = text.iter().map(|t| t.as_bytes().to_vec()).collect();
    if name == "frame" {
        let mut buf = BytesMut::new();
        let hello = serde_json::json!({"t": "heartbeat"});
        if encode(&hello, &mut buf).is_ok() {
            out.push(buf.to_vec());
        }
        out.push(vec![0, 0, 0, 3, 0x81, 0xa1, b't']);
        out.push(vec![0xff, 0xff, 0xff, 0xff]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), so a failure replays.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// A mutation of `seed`: bytes flipped, inserted, removed, cut, or
    /// pieces of the seed repeated.
    fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
        let mut data = seed.to_vec();
        for _ in 0..=rng.below(8) {
            let at = rng.below(data.len() + 1);
            match rng.below(6) {
                0 if at < data.len() => data[at] ^= 1 << rng.below(8),
                1 => data.insert(at, rng.next() as u8),
                2 if at < data.len() => {
                    data.remove(at);
                }
                3 => data.truncate(at),
                4 if !data.is_empty() => {
                    let from = rng.below(data.len());
                    let len = rng.below(data.len() - from + 1);
                    let piece = data[from..from + len].to_vec();
                    data.splice(at..at, piece);
                }
                _ => data.insert(at, b"\"{}[],:0\n%\\"[rng.below(11)]),
            }
        }
        data
    }

    /// The bounded run of every target: the seeds, then mutations of them
    /// (`CREW_FUZZ_ITERATIONS` each, default 20,000), then random bytes.
    #[test]
    fn targets_survive_mutated_and_random_input() {
        let iterations: usize =
            std::env::var("CREW_FUZZ_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
        for &name in TARGETS {
            let seeds = seeds(name);
            assert!(!seeds.is_empty(), "target {name} has no seeds");
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            for s in &seeds {
                assert!(run(name, s));
            }
            for i in 0..iterations {
                let data = if i % 10 == 9 {
                    (0..rng.below(64)).map(|_| rng.next() as u8).collect()
                } else {
                    let seed = &seeds[rng.below(seeds.len())];
                    mutate(&mut rng, seed)
                };
                run(name, &data);
            }
        }
    }

    #[test]
    fn an_unknown_target_is_refused() {
        assert!(!run("nope", b""));
    }
}
