//! What makes a target up to date: its [`Identity`] (everything it
//! declares, inputs by content) and its [`Record`] in the store.
//!
//! Store layout (all under `pipeline/`):
//!
//! ```text
//! pipeline/records/<target>.json            a plain target's record
//! pipeline/records/<target>/<hex16>.json    a branch's record (hex of its label's SHA-256)
//! pipeline/objects/<hash>/<run>/<attempt>/outputs/<name>   the outputs of one build
//! pipeline/cas/<sha256>                     source inputs, staged for the jobs
//! ```
//!
//! A record is one object, written whole by one `put` (atomic in every
//! store: readers see the old record or the new one). Outputs live under a
//! prefix unique to the build (`<run>` is random per `crew make`), so two
//! `crew make` on one store never write the same object: the last record
//! written wins, and each record only ever points at complete objects.

use std::collections::BTreeMap;

use crew_core::output::{StoredObject, Timestamp};
use crew_core::store::{StoreError, StoreKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::file::CommandDef;

/// The version of the identity and record formats.
pub const RECORD_FORMAT: u32 = 1;

/// The prefix of every record.
pub const RECORDS_PREFIX: &str = "pipeline/records";
/// The prefix of every build's outputs.
pub const OBJECTS_PREFIX: &str = "pipeline/objects";
/// The prefix of staged source inputs.
pub const CAS_PREFIX: &str = "pipeline/cas";

/// Everything a target declares that can change what it produces. Two
/// builds with equal identities are interchangeable; nothing else — the
/// launching shell's environment, the folder `crew make` ran from, the
/// machine, the worker class — takes part.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// [`RECORD_FORMAT`].
    pub v: u32,
    /// The target (or branch) name; its job's seed derives from it.
    pub name: String,
    /// The command after map values were substituted.
    pub command: CommandDef,
    /// The declared environment.
    pub env: BTreeMap<String, String>,
    /// Names passed through from the worker's environment (values are not
    /// part of the identity).
    pub env_inherit: Vec<String>,
    /// Each input's name in the job's folder → the SHA-256 of its content.
    pub inputs: BTreeMap<String, String>,
    /// The output patterns.
    pub outputs: Vec<String>,
    /// The job's seed (`CREW_SEED`).
    pub seed: u64,
    /// Targets ordered before it by `after` → their identity hashes.
    pub after: BTreeMap<String, String>,
}

impl Identity {
    /// The SHA-256 (hex) of the identity's canonical encoding: every
    /// field in order, each string and list length-prefixed, so that no two
    /// identities encode alike.
    pub fn hash(&self) -> String {
        fn put(h: &mut Sha256, s: &str) {
            h.update((s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        }
        fn count(h: &mut Sha256, n: usize) {
            h.update((n as u64).to_le_bytes());
        }
        let mut h = Sha256::new();
        h.update(b"crew-identity");
        h.update(self.v.to_le_bytes());
        put(&mut h, &self.name);
        match &self.command {
            CommandDef::Argv(argv) => {
                h.update(b"a");
                count(&mut h, argv.len());
                argv.iter().for_each(|a| put(&mut h, a));
            }
            CommandDef::Shell(line) => {
                h.update(b"s");
                put(&mut h, line);
            }
        }
        for map in [&self.env, &self.inputs, &self.after] {
            count(&mut h, map.len());
            for (k, v) in map {
                put(&mut h, k);
                put(&mut h, v);
            }
        }
        for list in [&self.env_inherit, &self.outputs] {
            count(&mut h, list.len());
            list.iter().for_each(|x| put(&mut h, x));
        }
        h.update(self.seed.to_le_bytes());
        hex(&h.finalize())
    }
}

/// How the build of a record went.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BuildInfo {
    /// The job's id in its controller.
    pub job: u64,
    /// The attempt that succeeded.
    pub attempt: u32,
    /// Seconds it ran.
    pub seconds: f64,
    /// Where it ran (the slot).
    pub slot: Option<String>,
    /// When the record was written.
    pub at: Timestamp,
}

/// A built target, as kept in the store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// [`RECORD_FORMAT`].
    pub v: u32,
    /// The target (or branch).
    pub target: String,
    /// The identity's hash.
    pub hash: String,
    /// The identity itself, so that `crew why` can say what changed.
    pub identity: Identity,
    /// What the build produced.
    pub outputs: Vec<StoredObject>,
    /// How it was built.
    pub build: BuildInfo,
}

/// The key of the record of target or branch `label` of target `target`.
pub fn record_key(target: &str, label: &str) -> Result<StoreKey, StoreError> {
    if label == target {
        StoreKey::new(format!("{RECORDS_PREFIX}/{target}.json"))
    } else {
        let digest = hex(&Sha256::digest(label.as_bytes()));
        StoreKey::new(format!("{RECORDS_PREFIX}/{target}/{}.json", &digest[..16]))
    }
}

/// The key of a staged source input.
pub fn cas_key(sha256: &str) -> Result<StoreKey, StoreError> {
    StoreKey::new(format!("{CAS_PREFIX}/{sha256}"))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// What differs between a record's identity and the current one, in
/// words, for `crew outdated` and `crew why`.
pub fn differences(old: &Identity, new: &Identity) -> Vec<String> {
    let mut out = Vec::new();
    let short = |h: &str| h.chars().take(12).collect::<String>();
    if old.v != new.v {
        out.push(format!("the record format changed ({} -> {})", old.v, new.v));
    }
    if old.command != new.command {
        out.push(format!("the command changed: {} -> {}", describe(&old.command), describe(&new.command)));
    }
    for (k, v) in &new.env {
        match old.env.get(k) {
            None => out.push(format!("env {k} was added ({k}={v})")),
            Some(o) if o != v => out.push(format!("env {k} changed: {o:?} -> {v:?}")),
            _ => {}
        }
    }
    for k in old.env.keys().filter(|k| !new.env.contains_key(*k)) {
        out.push(format!("env {k} was removed"));
    }
    if old.env_inherit != new.env_inherit {
        out.push(format!("env_inherit changed: {:?} -> {:?}", old.env_inherit, new.env_inherit));
    }
    for (name, sha) in &new.inputs {
        match old.inputs.get(name) {
            None => out.push(format!("input {name} was added")),
            Some(o) if o != sha => out.push(format!("input {name} changed (content {} -> {})", short(o), short(sha))),
            _ => {}
        }
    }
    for name in old.inputs.keys().filter(|k| !new.inputs.contains_key(*k)) {
        out.push(format!("input {name} was removed"));
    }
    if old.outputs != new.outputs {
        out.push(format!("the outputs changed: {:?} -> {:?}", old.outputs, new.outputs));
    }
    if old.seed != new.seed {
        out.push(format!("the seed changed: {} -> {}", old.seed, new.seed));
    }
    for (name, h) in &new.after {
        match old.after.get(name) {
            None => out.push(format!("after {name} was added")),
            Some(o) if o != h => out.push(format!("upstream {name} (after) was rebuilt with another identity")),
            _ => {}
        }
    }
    for name in old.after.keys().filter(|k| !new.after.contains_key(*k)) {
        out.push(format!("after {name} was removed"));
    }
    if out.is_empty() && old != new {
        out.push("its identity changed".into());
    }
    out
}

fn describe(c: &CommandDef) -> String {
    match c {
        CommandDef::Argv(a) => format!("{a:?}"),
        CommandDef::Shell(s) => format!("{s:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            v: RECORD_FORMAT,
            name: "total".into(),
            command: CommandDef::Shell("x".into()),
            env: BTreeMap::from([("LC_ALL".into(), "C".into())]),
            env_inherit: Vec::new(),
            inputs: BTreeMap::from([("data.csv".into(), "aa".repeat(32))]),
            outputs: vec!["total.txt".into()],
            seed: 1,
            after: BTreeMap::new(),
        }
    }

    #[test]
    fn the_hash_is_pinned_and_differences_are_named() {
        let a = identity();
        // Pinned: a change here invalidates every user's cache.
        assert_eq!(a.hash(), "ae61325b1275846a85b270072275d5934cb9a404a7b3c81d2a9dcafd69690637");
        assert_eq!(a.hash(), identity().hash());
        let mut b = a.clone();
        b.env.insert("LC_ALL".into(), "en_US".into());
        b.inputs.insert("data.csv".into(), "bb".repeat(32));
        b.command = CommandDef::Shell("y".into());
        assert_ne!(a.hash(), b.hash());
        let d = differences(&a, &b);
        assert!(d.iter().any(|l| l.starts_with("the command changed")), "{d:?}");
        assert!(d.iter().any(|l| l == "env LC_ALL changed: \"C\" -> \"en_US\""), "{d:?}");
        assert!(d.iter().any(|l| l.starts_with("input data.csv changed")), "{d:?}");
    }

    #[test]
    fn record_keys() {
        assert_eq!(record_key("raw", "raw").unwrap().as_str(), "pipeline/records/raw.json");
        let k = record_key("fit", "fit[a]").unwrap();
        assert!(k.as_str().starts_with("pipeline/records/fit/") && k.as_str().ends_with(".json"));
    }
}
