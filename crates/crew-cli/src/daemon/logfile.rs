//! `daemon.log` rotation by size.
//!
//! The daemon's stdout and stderr are `DIR/daemon.log` (opened by the
//! command that started it). Every log event goes through [`Writer`], which
//! writes to stderr and counts; past `[daemon] log_size` bytes the file is
//! renamed `daemon.log.1` (older ones shift up to `log_files`, the last
//! dropped) and a fresh `daemon.log` (0600) takes the place of stdout and
//! stderr (`dup2`), so that a panic message lands in the current file too.
//! A daemon run by hand (stderr not `daemon.log`) does not rotate.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// Rotation at this size by default.
pub(crate) const LOG_SIZE: u64 = 16 * 1024 * 1024;
/// Rotated files kept by default (`daemon.log.1` .. `.3`).
pub(crate) const LOG_FILES: u32 = 3;

struct Rotation {
    path: PathBuf,
    max: u64,
    keep: u32,
    size: u64,
}

static ROTATION: OnceLock<Mutex<Rotation>> = OnceLock::new();

/// Starts rotating `path` when it is this process's stderr.
pub(crate) fn install(path: PathBuf, max: u64, keep: u32) {
    let (Ok(file), Ok(err)) =
        (std::fs::metadata(&path), std::fs::File::open("/proc/self/fd/2").and_then(|f| f.metadata()))
    else {
        return;
    };
    if file.dev() != err.dev() || file.ino() != err.ino() {
        return;
    }
    let _ = ROTATION.set(Mutex::new(Rotation { path, max: max.max(1), keep: keep.max(1), size: file.len() }));
}

/// The daemon's log writer (stderr, rotated).
pub(crate) struct Writer;

/// Log lines that could not be written (a full disk), told in the log
/// once writing works again.
static DROPPED: AtomicU64 = AtomicU64::new(0);

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // A log line that cannot be written is dropped, never an error:
        // the logging layer would report it with `eprintln!`, which
        // panics (in whatever thread logged) when stderr is that same
        // full file.
        let mut err = std::io::stderr();
        let dropped = DROPPED.load(Ordering::Relaxed);
        if dropped > 0 {
            let note = format!("[{dropped} log lines were lost: the disk was full]\n");
            if err.write_all(note.as_bytes()).is_ok() {
                DROPPED.fetch_sub(dropped, Ordering::Relaxed);
            }
        }
        let n = match err.write(buf) {
            Ok(n) => n,
            Err(_) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
                return Ok(buf.len());
            }
        };
        if let Some(r) = ROTATION.get() {
            let mut r = r.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            r.size += n as u64;
            if r.size >= r.max {
                // Logging cannot log its own failure: the file keeps
                // growing until a later rotation works.
                if rotate(&r).is_ok() {
                    r.size = 0;
                }
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

fn rotate(r: &Rotation) -> std::io::Result<()> {
    let numbered = |i: u32| {
        let mut p = r.path.clone().into_os_string();
        p.push(format!(".{i}"));
        PathBuf::from(p)
    };
    for i in (1..r.keep).rev() {
        match std::fs::rename(numbered(i), numbered(i + 1)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    std::fs::rename(&r.path, numbered(1))?;
    let fresh = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&r.path)?;
    for fd in [1, 2] {
        // SAFETY: dup2 onto our own stdout/stderr of a descriptor we own.
        if unsafe { libc::dup2(fresh.as_raw_fd(), fd) } == -1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
