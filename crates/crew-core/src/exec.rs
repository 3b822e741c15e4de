//! Running one job on a worker: processes, builtins, capture, limits.
//!
//! (Being written: see the public items below for the interface.)

use serde::{Deserialize, Serialize};

use crate::output::{Captured, Status, Timestamp};

/// What the agent reports for one attempt of a job. The controller adds the
/// job's identity, slot, class, attempt and seed to make an
/// [`crate::Output`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    /// `Succeeded`, `Failed`, `TimedOut` or `Cancelled` (the agent never
    /// reports `Crashed` or `LaunchFailed`; the controller decides those).
    pub status: Status,
    /// Exit code of the main process, when it exited.
    pub exit_code: Option<i32>,
    /// Signal that killed the main process, when it was killed.
    pub signal: Option<i32>,
    /// Why it did not succeed, in words.
    pub error: Option<String>,
    /// Captured standard output.
    pub stdout: Captured,
    /// Captured standard error.
    pub stderr: Captured,
    /// When the attempt started.
    pub started: Timestamp,
    /// When it ended.
    pub finished: Timestamp,
    /// Wall-clock seconds.
    pub wall_seconds: f64,
    /// User + system CPU seconds of the job's processes.
    pub cpu_seconds: f64,
    /// Peak resident set size of the largest process, in bytes.
    pub peak_rss_bytes: u64,
}
