//! The daemon API (docs/api.md), both ways: one type per request body,
//! written by the client (`cmd`, `project`, `make_daemon`) and read by the
//! daemon (`daemon::api`, which refuses unknown fields), and one type per
//! answer, written by the daemon and read by the client, so that the two
//! sides cannot drift apart. A field an older daemon may lack is
//! `#[serde(default)]` here, once.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crew_controller::SlotStatus;
use crew_core::Output;
use crew_core::staging::StoredObject;
use serde::{Deserialize, Serialize};
use serde_json::Value;

// ---- Requests -------------------------------------------------------------
//
// A duration field is a JSON value, `"30s"` or a number of seconds, checked
// by the daemon (so that a bad one from any client gets the same error);
// `null` or absent means none (or the daemon's default).

/// A body with no fields (`POST /v1/restart`, `POST /v1/down`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Empty {}

/// `POST /v1/recruit`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RecruitRequest {
    pub(crate) class: String,
    pub(crate) workers: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tags: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub(crate) idle: Value,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub(crate) wall: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tasks_max: Option<u32>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub(crate) launch_timeout: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) launch_max: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) prefetch: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) options: Option<BTreeMap<String, String>>,
}

/// `POST /v1/launch`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LaunchRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tags: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) workers: Option<usize>,
}

/// `POST /v1/jobs`: jobs in the job-line JSON form, each checked by the
/// daemon (which reads them as values); clients write them with
/// [`crew_core::JobSpec::as_line`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SendRequest<J = Value> {
    pub(crate) jobs: Vec<J>,
}

/// `POST /v1/receive`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReceiveRequest {
    #[serde(default)]
    pub(crate) wait: bool,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub(crate) timeout: Value,
    #[serde(default)]
    pub(crate) all: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) name: Option<String>,
    /// Only outputs of these jobs: every one of them ready now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ids: Option<Vec<crew_core::JobId>>,
}

/// `POST /v1/shutdown`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ShutdownRequest {
    #[serde(default)]
    pub(crate) all: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tags: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) slot: Option<String>,
}

/// `POST /v1/dismiss`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DismissRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) tags: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) slot: Option<String>,
}

/// `POST /v1/cancel`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CancelRequest {
    pub(crate) ids: Vec<u64>,
}

/// A duration flag as a request field.
pub(crate) fn duration_value(text: Option<String>) -> Value {
    text.map_or(Value::Null, Value::String)
}

// ---- Answers --------------------------------------------------------------

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
    /// The TCP listener of the API, when there is one.
    #[serde(default)]
    pub(crate) http: Option<HttpInfo>,
}

/// The API's TCP listener (`crew up --http`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HttpInfo {
    /// Its address.
    pub(crate) listen: String,
    /// The file holding the bearer token every request needs.
    pub(crate) token_file: PathBuf,
    /// The SHA-256 of its certificate, when it speaks TLS (beyond
    /// loopback).
    pub(crate) tls_sha256: Option<String>,
}

/// Where the controller listens for workers, the address workers of
/// classes that run elsewhere dial, the TLS mode (`auto`, `always`) and the
/// SHA-256 of the certificate they pin when their connections use TLS.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Workers {
    pub(crate) listen: String,
    pub(crate) advertise: String,
    pub(crate) tls: crew_controller::TlsMode,
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
    /// The TCP listener of the API, when there is one.
    #[serde(default)]
    pub(crate) http: Option<HttpInfo>,
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

/// Where a job is, in `GET /v1/jobs/{job}` and `GET /v1/jobs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub(crate) enum JobState {
    /// Waiting for a worker.
    Queued,
    /// Sent to a worker, waiting behind the job it runs (prefetched).
    Assigned,
    /// Running on a worker.
    Running,
    /// Ended; its record waits to be received.
    Finished,
    /// Ended, and its record was received.
    Received,
}

impl JobState {
    /// The word for it (as in JSON and in `?state=`).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Assigned => "assigned",
            Self::Running => "running",
            Self::Finished => "finished",
            Self::Received => "received",
        }
    }

    /// Every state, for parsing `?state=`.
    pub(crate) const ALL: [JobState; 5] = [Self::Queued, Self::Assigned, Self::Running, Self::Finished, Self::Received];
}

/// `GET /v1/jobs/{job}`, and each job of `GET /v1/jobs` (without `output`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct JobInfo {
    pub(crate) id: u64,
    pub(crate) name: Option<String>,
    pub(crate) state: JobState,
    /// The slot that runs (or ran) it.
    pub(crate) slot: Option<String>,
    /// The attempt running now, or the last one.
    pub(crate) attempt: u32,
    /// When the daemon accepted it (known until it is received; unknown
    /// for jobs from before a restart).
    pub(crate) sent: Option<crew_core::output::Timestamp>,
    /// When its current (or last) attempt was given to a worker (known
    /// until it is received).
    pub(crate) assigned: Option<crew_core::output::Timestamp>,
    /// When its last attempt started running on its worker (from its
    /// record, once final).
    pub(crate) started: Option<crew_core::output::Timestamp>,
    /// When it ended.
    pub(crate) finished: Option<crew_core::output::Timestamp>,
    /// How it ended.
    pub(crate) status: Option<crew_core::Status>,
    /// Its output record, once final (not in lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) output: Option<Output>,
}

/// `GET /v1/jobs`: one page, in id order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct JobList {
    pub(crate) jobs: Vec<JobInfo>,
    /// `after=` for the next page; absent on the last one.
    pub(crate) next: Option<u64>,
}

/// One event of `GET /v1/events` (server-sent events: the `event:` line is
/// `type`, the `data:` line this object).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub(crate) enum Event {
    /// Jobs were accepted (one event per `POST /v1/jobs`).
    JobsSent { ids: Vec<u64> },
    /// An attempt of a job was given to a worker (which runs it at once,
    /// or after the jobs it holds already when it prefetches).
    JobAssigned { id: u64, slot: String, attempt: u32 },
    /// A job ended; its record is durable and can be received.
    JobEnded { id: u64, name: Option<String>, status: crew_core::Status, slot: Option<String>, attempt: u32 },
    /// A slot's worker connected.
    SlotUp { slot: String },
    /// A slot's worker went away.
    SlotDown { slot: String },
    /// A slot's worker was lost while up (it crashed).
    SlotCrashed { slot: String, class: String, reason: String },
    /// This stream fell behind and `missed` events were dropped: read the
    /// state again (`GET /v1/status`, `GET /v1/jobs`).
    Lagged { missed: u64 },
}

impl Event {
    /// The SSE event name: the `type` field.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::JobsSent { .. } => "jobs_sent",
            Self::JobAssigned { .. } => "job_assigned",
            Self::JobEnded { .. } => "job_ended",
            Self::SlotUp { .. } => "slot_up",
            Self::SlotDown { .. } => "slot_down",
            Self::SlotCrashed { .. } => "slot_crashed",
            Self::Lagged { .. } => "lagged",
        }
    }
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
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
}

/// The stable code of an error answer (docs/api.md, "Errors"), and the
/// HTTP status that goes with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub(crate) enum ErrorCode {
    BadRequest,
    Unauthorized,
    BadHost,
    InvalidJob,
    InvalidInput,
    UnknownClass,
    InvalidOption,
    NotFound,
    DuplicateName,
    JobTooLarge,
    BodyTooLarge,
    LogTooLarge,
    NoMatchingWorker,
    ClassFailed,
    ShuttingDown,
    DiskFull,
    Internal,
    /// A code this client does not know (from a newer daemon).
    #[serde(other)]
    Other,
}

impl ErrorCode {
    /// Every code the daemon answers.
    #[cfg(test)]
    pub(crate) const ALL: [ErrorCode; 17] = [
        Self::BadRequest,
        Self::Unauthorized,
        Self::BadHost,
        Self::InvalidJob,
        Self::InvalidInput,
        Self::UnknownClass,
        Self::InvalidOption,
        Self::NotFound,
        Self::DuplicateName,
        Self::JobTooLarge,
        Self::BodyTooLarge,
        Self::LogTooLarge,
        Self::NoMatchingWorker,
        Self::ClassFailed,
        Self::ShuttingDown,
        Self::DiskFull,
        Self::Internal,
    ];

    /// The HTTP status of an answer with this code.
    pub(crate) fn status(self) -> u16 {
        match self {
            Self::BadRequest | Self::InvalidJob | Self::InvalidInput | Self::UnknownClass | Self::InvalidOption => 400,
            Self::Unauthorized => 401,
            Self::BadHost => 403,
            Self::NotFound => 404,
            Self::DuplicateName => 409,
            Self::JobTooLarge | Self::BodyTooLarge | Self::LogTooLarge => 413,
            Self::NoMatchingWorker => 422,
            Self::Internal | Self::Other => 500,
            Self::ClassFailed => 502,
            Self::ShuttingDown => 503,
            Self::DiskFull => 507,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The serde name: a unit variant serializes to its string.
        match serde_json::to_value(self) {
            Ok(Value::String(s)) => f.write_str(&s),
            _ => write!(f, "{self:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/api.md's table of errors is this enum: same codes, same
    /// statuses.
    #[test]
    fn the_error_codes_are_the_documented_ones() {
        let doc = include_str!("../../../docs/api.md");
        let mut documented: Vec<(u16, String)> = doc
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let status: u16 = cells.get(1)?.parse().ok()?;
                let code = cells.get(2)?.strip_prefix('`')?.strip_suffix('`')?;
                Some((status, code.to_owned()))
            })
            .collect();
        documented.sort();
        let mut ours: Vec<(u16, String)> = ErrorCode::ALL.iter().map(|c| (c.status(), c.to_string())).collect();
        ours.sort();
        assert_eq!(documented, ours);
        let unknown: ErrorDetail = serde_json::from_str(r#"{"code": "from_the_future", "message": "m"}"#).unwrap();
        assert_eq!(unknown.code, ErrorCode::Other);
    }
}
