//! The daemon API's answers (docs/api.md): one type per answer, written by
//! the daemon (`daemon::api`) and read by its client (`cmd`, `project`,
//! `make_daemon`), so that the two sides cannot drift apart. A field an
//! older daemon may lack is `#[serde(default)]` here, once.

use std::path::PathBuf;

use crew_controller::SlotStatus;
use crew_core::Output;
use crew_core::staging::StoredObject;
use serde::{Deserialize, Serialize};

/// `GET /v1/health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Health {
    pub(crate) ok: bool,
    pub(crate) pid: u32,
    pub(crate) version: String,
    pub(crate) dir: PathBuf,
    /// The URL of the daemon's store.
    pub(crate) store: String,
    /// Where workers connect, and how.
    #[serde(flatten)]
    pub(crate) workers: Workers,
}

/// Where the controller listens for workers, the address workers of
/// classes that run elsewhere dial, the TLS mode (`auto`, `always`) and the
/// SHA-256 of the certificate they pin when their connections use TLS.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Workers {
    pub(crate) listen: String,
    pub(crate) advertise: String,
    pub(crate) tls: String,
    pub(crate) tls_sha256: Option<String>,
}

/// `jobs` of `GET /v1/status`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub(crate) struct JobCounts {
    pub(crate) queued: u64,
    pub(crate) running: u64,
    pub(crate) ready: u64,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Status {
    pub(crate) pid: u32,
    pub(crate) dir: PathBuf,
    pub(crate) slots: Vec<SlotStatus>,
    pub(crate) jobs: JobCounts,
    pub(crate) workers: Workers,
}

/// `POST /v1/recruit`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Recruited {
    pub(crate) slots: Vec<String>,
    /// What may keep the slots from working.
    #[serde(default)]
    pub(crate) warnings: Vec<String>,
}

/// `POST /v1/launch`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Launched {
    pub(crate) launched: usize,
}

/// `POST /v1/jobs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Sent {
    pub(crate) ids: Vec<u64>,
}

/// `POST /v1/receive`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Received {
    pub(crate) outputs: Vec<Output>,
    /// Jobs sent and not yet received.
    pub(crate) pending: u64,
}

/// `GET /v1/sendable`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Sendable {
    pub(crate) sendable: bool,
}

/// `GET /v1/receivable`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Receivable {
    pub(crate) receivable: bool,
}

/// `POST /v1/shutdown`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Stopped {
    pub(crate) stopped: usize,
}

/// `POST /v1/dismiss`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Dismissed {
    pub(crate) dismissed: usize,
}

/// `POST /v1/restart`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Restarted {
    pub(crate) restarted: usize,
}

/// `POST /v1/cancel`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Cancelled {
    pub(crate) cancelled: Vec<u64>,
    pub(crate) unknown: Vec<u64>,
}

/// `GET /v1/jobs/{job}/logs` (streams up to 64 MiB).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Logs {
    pub(crate) id: u64,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// `GET /v1/jobs/{job}/objects`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Objects {
    pub(crate) id: u64,
    pub(crate) name: Option<String>,
    pub(crate) status: crew_core::Status,
    pub(crate) attempt: u32,
    /// The URL of the store that holds them.
    pub(crate) store: String,
    pub(crate) objects: Vec<StoredObject>,
}

/// A request that only says it was done.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Done {
    pub(crate) ok: bool,
}

/// Every error answer: `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ErrorAnswer {
    pub(crate) error: ErrorDetail,
}

/// The machine-readable code and the human message of an error.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ErrorDetail {
    pub(crate) code: String,
    pub(crate) message: String,
}
