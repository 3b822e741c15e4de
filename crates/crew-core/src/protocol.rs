//! The wire protocol between the controller and its agents.
//!
//! Frames are length-delimited (a 4-byte big-endian length, then the
//! payload) and the payload is MessagePack with named fields, a
//! self-describing encoding: agents in other languages can speak it, and
//! fields can be added without breaking older peers.
//!
//! The agent speaks first with [`AgentMsg::Hello`] (protocol version, launch
//! id, index, secret); the controller answers [`ControllerMsg::Welcome`] or
//! [`ControllerMsg::Reject`] and closes. Then jobs flow down ([`ControllerMsg::Run`]),
//! results flow up ([`AgentMsg::Done`]), and both sides send heartbeats when
//! they have nothing else to say.
//!
//! **Invariant:** a decoder never panics and never allocates more than
//! [`MAX_FRAME`] for one frame: an oversized length or a payload that does
//! not decode is a [`ProtocolError`], and the connection is closed with a
//! logged reason.
//!
//! **API boundary:** this is version [`PROTOCOL_VERSION`]. Any change that an
//! older peer would misread bumps it; the handshake refuses mismatches with a
//! message naming both versions.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use serde::{Deserialize, Serialize};

use crate::job::{JobId, JobSpec};
use crate::output::JobResult;
use crate::worker::Secret;

/// The protocol version this build speaks. Version 2 added job inputs and
/// outputs (`JobOptions::inputs`/`outputs`, `JobResult::objects`): an agent of
/// version 1 would silently run such a job without its data. Version 3
/// gives jobs a clean environment (`JobOptions::env_inherit`): an agent of
/// version 2 would ignore the list and give the job its whole environment,
/// and its CPU and memory limits (`JobOptions::cpu`/`memory`).
/// It also added [`AgentMsg::Objects`] (a result's object list in several frames):
/// a controller of version 2 would drop those frames and the objects.
pub const PROTOCOL_VERSION: u32 = 3;

/// Largest frame accepted, in bytes. Results carry at most the inline caps
/// of stdout and stderr and a capped error message; a list of output
/// objects too long for one frame goes ahead in [`AgentMsg::Objects`]
/// frames. Jobs larger than a frame are refused when sent
/// ([`crate::job::MAX_JOB_BYTES`]).
pub const MAX_FRAME: usize = 8 * 1024 * 1024;

/// Messages from an agent to the controller.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum AgentMsg {
    /// First message: who I am.
    Hello {
        /// Protocol version the agent speaks.
        version: u32,
        /// The launch id it was started with.
        launch: String,
        /// Its index within the launch.
        index: u32,
        /// The launch secret.
        token: Secret,
        /// Its process id on its host.
        pid: u32,
        /// Its host name.
        host: String,
    },
    /// First message of an agent that outlived its controller and comes
    /// back to the restarted one: the slot it is, the credential the
    /// previous controller gave it in [`ControllerMsg::Welcome`], and the
    /// jobs it holds (running, or finished with a result it will send
    /// next), each with its attempt.
    Resume {
        /// Protocol version the agent speaks.
        version: u32,
        /// The slot's name.
        slot: String,
        /// The slot's reconnect credential.
        token: Secret,
        /// Its process id on its host.
        pid: u32,
        /// Its host name.
        host: String,
        /// Jobs it holds: running, or finished and not known to be recorded.
        jobs: Vec<(JobId, u32)>,
    },
    /// A job attempt ended.
    Done {
        /// The job.
        job: JobId,
        /// The attempt it was.
        attempt: u32,
        /// What happened.
        result: Box<JobResult>,
    },
    /// Part of the object list of the result of `job`'s `attempt`, sent
    /// before its [`AgentMsg::Done`] when the whole list would not fit one
    /// frame (tens of thousands of output files). The controller puts the
    /// parts together, in order, ahead of the `Done`'s own objects.
    Objects {
        /// The job.
        job: JobId,
        /// The attempt.
        attempt: u32,
        /// The next objects of the list.
        objects: Vec<crate::staging::StoredObject>,
    },
    /// Answer to [`ControllerMsg::Revoke`]: `ok` when the job was given back
    /// unstarted, false when it had already started (its `Done` follows or
    /// came before).
    Revoked {
        /// The job.
        job: JobId,
        /// Given back?
        ok: bool,
    },
    /// Nothing to report; still alive.
    Heartbeat,
    /// The agent is leaving by itself (idle timeout, task limit).
    Bye {
        /// Why.
        reason: String,
    },
}

/// One job handed to an agent.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunJob {
    /// The job's id.
    pub job: JobId,
    /// Which attempt this is (1-based).
    pub attempt: u32,
    /// The job's seed (exported as `CREW_SEED`).
    pub seed: u64,
    /// What to run.
    pub spec: Arc<JobSpec>,
}

/// What an agent needs to come back to a restarted controller.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResumeGrant {
    /// The slot's reconnect credential (never logged: `Secret` redacts).
    pub token: Secret,
    /// How long the agent keeps trying before it stops (killing its job).
    pub window: Duration,
}

/// Messages from the controller to an agent.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum ControllerMsg {
    /// The handshake succeeded.
    Welcome {
        /// Protocol version the controller speaks.
        version: u32,
        /// The slot this agent is.
        slot: String,
        /// Exit after this long without a job (the controller normally stops
        /// idle workers itself; this guards against a lost controller).
        idle_timeout: Option<Duration>,
        /// Exit after this many jobs.
        tasks_max: Option<u32>,
        /// Send a heartbeat when nothing was sent for this long; consider the
        /// controller lost after three times this without a frame.
        heartbeat: Duration,
        /// The store URL for large stdout/stderr and job data.
        store: Option<String>,
        /// When set, the agent may outlive this controller: if the
        /// connection drops, it keeps its running job and comes back with
        /// [`AgentMsg::Resume`] within the window (absent for older
        /// controllers: the agent then leaves when the connection drops).
        #[serde(default)]
        resume: Option<ResumeGrant>,
    },
    /// The handshake failed; the connection closes.
    Reject {
        /// Why, for the agent's log.
        reason: String,
    },
    /// Run this job (after the ones already sent).
    Run(Box<RunJob>),
    /// Give back this job if it has not started.
    Revoke {
        /// The job.
        job: JobId,
    },
    /// Cancel this job: kill it if it runs, drop it if it waits.
    Cancel {
        /// The job.
        job: JobId,
    },
    /// Nothing to say; still here.
    Heartbeat,
    /// Finish nothing more; exit now (jobs still held are abandoned: the
    /// controller has taken them back).
    Stop,
}

/// What can go wrong on the wire.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The peer announced a frame larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes is larger than the maximum of {MAX_FRAME}")]
    Oversized(usize),
    /// The payload is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The payload could not be encoded (a bug, or a value serde refuses).
    #[error("could not encode a message: {0}")]
    Encode(String),
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: peer speaks {peer}, this build speaks {PROTOCOL_VERSION}")]
    Version {
        /// The peer's version.
        peer: u32,
    },
    /// The socket failed or closed.
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
}

/// Appends one framed message to `buf`.
pub fn encode<T: Serialize>(msg: &T, buf: &mut BytesMut) -> Result<(), ProtocolError> {
    let start = buf.len();
    buf.put_u32(0);
    let mut w = buf.writer();
    let written = rmp_serde::encode::write_named(&mut w, msg);
    let buf = w.into_inner();
    if let Err(e) = written {
        buf.truncate(start);
        return Err(ProtocolError::Encode(e.to_string()));
    }
    let len = buf.len() - start - 4;
    if len > MAX_FRAME {
        buf.truncate(start);
        return Err(ProtocolError::Oversized(len));
    }
    buf[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// A message type of the wire: decoded from one frame's bytes.
///
/// Serde reads an internally tagged enum (`{"t": "done", ...}`) by first
/// copying the whole message into a tree of its own, then reading the
/// variant from that tree: about a fifth of a busy controller's time, one
/// message a job. Our encoder writes the tag first, so the frequent
/// messages are read straight into their variant's fields (the tag is then
/// an unknown field, ignored); anything else takes the general way.
pub trait Frame: Sized + for<'de> Deserialize<'de> {
    /// Decodes one frame.
    fn from_frame(frame: &[u8]) -> Result<Self, rmp_serde::decode::Error> {
        rmp_serde::from_slice(frame)
    }
}

/// The tag of a frame that opens with it (`{"t": TAG, ...}`, as [`encode`]
/// writes): a map, whose first key is the one-letter string `t`, whose
/// value is a short string.
fn leading_tag(frame: &[u8]) -> Option<&[u8]> {
    let rest = match frame.first()? {
        0x80..=0x8f => &frame[1..],
        0xde => frame.get(3..)?,
        0xdf => frame.get(5..)?,
        _ => return None,
    };
    let rest = rest.strip_prefix(&[0xa1, b't'])?;
    let marker = *rest.first()?;
    if !(0xa0..=0xbf).contains(&marker) {
        return None;
    }
    rest.get(1..1 + usize::from(marker - 0xa0))
}

impl Frame for AgentMsg {
    fn from_frame(frame: &[u8]) -> Result<Self, rmp_serde::decode::Error> {
        #[derive(Deserialize)]
        struct Done {
            job: JobId,
            attempt: u32,
            result: Box<JobResult>,
        }
        match leading_tag(frame) {
            Some(b"done") => rmp_serde::from_slice::<Done>(frame).map(|d| AgentMsg::Done {
                job: d.job,
                attempt: d.attempt,
                result: d.result,
            }),
            _ => rmp_serde::from_slice(frame),
        }
    }
}

impl Frame for ControllerMsg {
    fn from_frame(frame: &[u8]) -> Result<Self, rmp_serde::decode::Error> {
        match leading_tag(frame) {
            Some(b"run") => rmp_serde::from_slice::<RunJob>(frame).map(|r| ControllerMsg::Run(Box::new(r))),
            _ => rmp_serde::from_slice(frame),
        }
    }
}

/// Takes one whole message from the front of `buf`, if one is there.
/// `Ok(None)` means more bytes are needed. The length is checked before any
/// allocation.
pub fn decode<T: Frame>(buf: &mut BytesMut) -> Result<Option<T>, ProtocolError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::Oversized(len));
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    let frame = buf.split_to(len);
    T::from_frame(&frame).map(Some).map_err(|e| ProtocolError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::{Captured, Status, Timestamp};

    fn result() -> JobResult {
        let t = Timestamp(std::time::SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456));
        JobResult {
            status: Status::Succeeded,
            exit_code: Some(0),
            signal: None,
            error: None,
            stdout: Captured { text: "hi\n".into(), bytes: 3, truncated: false, key: None },
            stderr: Captured::default(),
            started: t,
            finished: t,
            wall_seconds: 0.5,
            cpu_seconds: 0.1,
            peak_rss_bytes: 1 << 20,
            objects: vec![crate::staging::StoredObject {
                name: "out/a.csv".into(),
                key: "jobs/1/1/outputs/out/a.csv".into(),
                size: 3,
                sha256: "ab".repeat(32),
            }],
        }
    }

    #[test]
    fn round_trip_many_in_one_buffer() {
        let mut buf = BytesMut::new();
        let mut spec = JobSpec::shell("echo hi");
        spec.opts.inputs.push(crate::job::Input {
            name: "in/data.csv".into(),
            source: crate::job::InputSource::Object { key: "cas/sha256/x".into(), size: 9, sha256: "cd".repeat(32) },
        });
        spec.opts.outputs.push("out/*".into());
        let spec = Arc::new(spec);
        encode(
            &ControllerMsg::Run(Box::new(RunJob { job: JobId(3), attempt: 1, seed: 9, spec: spec.clone() })),
            &mut buf,
        )
        .unwrap();
        encode(&ControllerMsg::Heartbeat, &mut buf).unwrap();
        encode(&AgentMsg::Done { job: JobId(3), attempt: 1, result: Box::new(result()) }, &mut buf).unwrap();
        match decode::<ControllerMsg>(&mut buf).unwrap() {
            Some(ControllerMsg::Run(r)) => {
                assert_eq!(r.job, JobId(3));
                assert_eq!(*r.spec, *spec);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(decode::<ControllerMsg>(&mut buf).unwrap(), Some(ControllerMsg::Heartbeat)));
        match decode::<AgentMsg>(&mut buf).unwrap() {
            Some(AgentMsg::Done { result, .. }) => assert_eq!(*result, self::result()),
            other => panic!("{other:?}"),
        }
        assert!(decode::<AgentMsg>(&mut buf).unwrap().is_none());
    }

    /// The direct reading of `done` and `run` frames gives what serde's
    /// general reading of the tagged enum gives, and a frame whose tag is
    /// not first (another encoder) still decodes the general way.
    #[test]
    fn frames_read_directly_match_the_general_reading() {
        let spec = Arc::new(JobSpec::shell("echo hi"));
        let run = ControllerMsg::Run(Box::new(RunJob { job: JobId(7), attempt: 2, seed: 5, spec }));
        let done = AgentMsg::Done { job: JobId(7), attempt: 2, result: Box::new(result()) };
        let run_bytes = rmp_serde::to_vec_named(&run).unwrap();
        let done_bytes = rmp_serde::to_vec_named(&done).unwrap();
        assert_eq!(leading_tag(&run_bytes), Some(&b"run"[..]));
        assert_eq!(leading_tag(&done_bytes), Some(&b"done"[..]));
        let general: ControllerMsg = rmp_serde::from_slice(&run_bytes).unwrap();
        assert_eq!(format!("{:?}", ControllerMsg::from_frame(&run_bytes).unwrap()), format!("{general:?}"));
        let general: AgentMsg = rmp_serde::from_slice(&done_bytes).unwrap();
        assert_eq!(format!("{:?}", AgentMsg::from_frame(&done_bytes).unwrap()), format!("{general:?}"));
        // The tag last: {"job": 7, "attempt": 2, "result": ..., "t": "done"}.
        #[derive(Serialize)]
        struct TagLast<'a> {
            job: JobId,
            attempt: u32,
            result: &'a JobResult,
            t: &'a str,
        }
        let r = result();
        let late = rmp_serde::to_vec_named(&TagLast { job: JobId(7), attempt: 2, result: &r, t: "done" }).unwrap();
        assert_eq!(leading_tag(&late), None);
        assert_eq!(format!("{:?}", AgentMsg::from_frame(&late).unwrap()), format!("{done:?}"));
        // A done frame missing a field is an error either way.
        #[derive(Serialize)]
        struct Short<'a> {
            t: &'a str,
            job: JobId,
        }
        let short = rmp_serde::to_vec_named(&Short { t: "done", job: JobId(7) }).unwrap();
        assert!(AgentMsg::from_frame(&short).is_err());
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let mut full = BytesMut::new();
        encode(&AgentMsg::Heartbeat, &mut full).unwrap();
        let mut buf = BytesMut::new();
        for b in full.iter() {
            assert!(decode::<AgentMsg>(&mut buf).unwrap().is_none());
            buf.put_u8(*b);
        }
        assert!(matches!(decode::<AgentMsg>(&mut buf).unwrap(), Some(AgentMsg::Heartbeat)));
    }

    #[test]
    fn oversized_and_garbage_are_errors() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 1, 2][..]);
        assert!(matches!(decode::<AgentMsg>(&mut buf), Err(ProtocolError::Oversized(_))));
        let mut buf = BytesMut::from(&[0, 0, 0, 3, 0xc1, 0xc1, 0xc1][..]);
        assert!(matches!(decode::<AgentMsg>(&mut buf), Err(ProtocolError::Malformed(_))));
        // HTTP on the worker port.
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n\r\n"[..]);
        assert!(decode::<AgentMsg>(&mut buf).is_err());
    }

    #[test]
    fn fuzz_like_random_input_never_panics() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut bytes = Vec::new();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = (x % 64) as usize;
            for i in 0..n {
                bytes.push((x.rotate_left(i as u32 * 7) & 0xff) as u8);
            }
            if bytes.len() >= 4 {
                let l = (bytes.len() - 4) as u32;
                bytes[..4].copy_from_slice(&l.to_be_bytes());
            }
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = decode::<AgentMsg>(&mut buf);
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = decode::<ControllerMsg>(&mut buf);
        }
    }
}
