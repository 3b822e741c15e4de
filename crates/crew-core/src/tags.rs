//! Tags: the strings on slots and jobs that decide where a job may run.
//!
//! A job may run on a worker whose tags include **all** of the job's tags
//! (subset matching). A job without tags runs anywhere. Tags are kept sorted
//! and deduplicated so that two equal sets compare and hash equal, which the
//! scheduler relies on to group queued jobs and idle workers by tag set.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A set of tags, sorted and without duplicates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct Tags(BTreeSet<String>);

/// Why a tag was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid tag {tag:?}: {reason}")]
#[non_exhaustive]
pub struct TagError {
    /// The offending tag.
    pub tag: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Longest tag accepted, in bytes.
pub const TAG_MAX_LEN: usize = 64;

fn check_tag(tag: &str) -> Result<(), TagError> {
    let bad = |reason| Err(TagError { tag: tag.to_owned(), reason });
    if tag.is_empty() {
        return bad("a tag cannot be empty");
    }
    if tag.len() > TAG_MAX_LEN {
        return bad("a tag is at most 64 bytes");
    }
    // Tags travel in CLI flags (comma separated), in job names on cloud
    // platforms and in file names: keep them to a portable alphabet.
    if !tag.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'=')) {
        return bad("use only ASCII letters, digits and - _ . : =");
    }
    Ok(())
}

impl Tags {
    /// The empty set: matches any worker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a set from strings, validating each tag.
    pub fn try_from_iter<I, S>(iter: I) -> Result<Self, TagError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut set = BTreeSet::new();
        for tag in iter {
            let tag = tag.into();
            check_tag(&tag)?;
            set.insert(tag);
        }
        Ok(Self(set))
    }

    /// True when a worker with tags `self` may run a job with tags `job`.
    pub fn satisfies(&self, job: &Tags) -> bool {
        job.0.is_subset(&self.0)
    }

    /// Number of tags.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no tags.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The tags, in sorted order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }

    /// True when `tag` is in the set.
    pub fn contains(&self, tag: &str) -> bool {
        self.0.contains(tag)
    }
}

impl FromStr for Tags {
    type Err = TagError;

    /// Parses a comma-separated list (`gpu,big`); blanks around commas and
    /// empty items are ignored, so `""` is the empty set.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::try_from_iter(s.split(',').map(str::trim).filter(|t| !t.is_empty()))
    }
}

impl TryFrom<Vec<String>> for Tags {
    type Error = TagError;
    fn try_from(v: Vec<String>) -> Result<Self, Self::Error> {
        Self::try_from_iter(v)
    }
}

impl From<Tags> for Vec<String> {
    fn from(t: Tags) -> Self {
        t.0.into_iter().collect()
    }
}

impl fmt::Display for Tags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for t in &self.0 {
            if !first {
                f.write_str(",")?;
            }
            f.write_str(t)?;
            first = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subset_matching() {
        let worker: Tags = "gpu,big".parse().unwrap();
        assert!(worker.satisfies(&"gpu".parse().unwrap()));
        assert!(worker.satisfies(&Tags::new()));
        assert!(worker.satisfies(&"big, gpu".parse().unwrap()));
        assert!(!worker.satisfies(&"gpu,small".parse().unwrap()));
        assert!(!Tags::new().satisfies(&"gpu".parse().unwrap()));
    }

    #[test]
    fn parsing_and_display() {
        let t: Tags = " b ,a,,a ".parse().unwrap();
        assert_eq!(t.to_string(), "a,b");
        assert!("".parse::<Tags>().unwrap().is_empty());
        assert!("a b".parse::<Tags>().is_err());
        assert!("x".repeat(65).parse::<Tags>().is_err());
        let json: Tags = serde_json::from_str(r#"["z","y"]"#).unwrap();
        assert_eq!(serde_json::to_string(&json).unwrap(), r#"["y","z"]"#);
        assert!(serde_json::from_str::<Tags>(r#"["bad tag"]"#).is_err());
    }
}
