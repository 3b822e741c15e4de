//! Builtins: functions compiled into the agent, run as jobs without a process.
//!
//! A job whose command is [`crew_core::Command::Builtin`] calls a function of the
//! agent's [`Builtins`] registry instead of starting a program. That serves
//! three purposes:
//!
//! - `noop` measures crew itself (scheduler, protocol, agent loop) without the
//!   cost of `fork`/`exec`; it is benchmarked at 100,000 jobs per second, so
//!   its path does no allocation, no system call and no spawning;
//! - `sleep` and `echo` give tests and examples jobs with a known duration and
//!   output on every worker, whatever is installed there;
//! - embedders who build their own agent binary register Rust functions
//!   ([`Builtins::register`]) and send them as jobs.
//!
//! **Invariant:** builtins run inside the agent process, on its async runtime.
//! They are not isolated: the agent measures no CPU time or memory for them,
//! and a builtin that blocks its thread blocks the agent (use
//! `tokio::task::spawn_blocking` for CPU-bound work). Timeouts and
//! cancellation drop the builtin's future, and also cancel
//! [`BuiltinContext::cancel`] so that work the builtin handed to other tasks
//! or threads can stop too.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crew_core::job::JobId;

/// What a builtin receives besides its JSON arguments: the job's identity and
/// environment, and a token cancelled when the job is timed out or cancelled.
#[derive(Clone, Debug)]
pub struct BuiltinContext {
    /// The job's id.
    pub id: JobId,
    /// The attempt number (1 for the first run).
    pub attempt: u32,
    /// The job's seed (the one processes get as `CREW_SEED`).
    pub seed: u64,
    /// The job's own environment variables (`JobSpec::env`); the agent's
    /// environment is not included.
    pub env: BTreeMap<String, String>,
    /// Cancelled when the job times out or is cancelled. The builtin's future
    /// is dropped at the same time; the token is for work it started
    /// elsewhere (spawned tasks, blocking threads).
    pub cancel: CancellationToken,
}

/// What a builtin that succeeded writes: its standard output and error, as
/// text. crew captures them exactly like a process's streams.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuiltinOutput {
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl BuiltinOutput {
    /// No output at all.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Output with `text` on stdout and nothing on stderr.
    pub fn stdout(text: impl Into<String>) -> Self {
        Self { stdout: text.into(), stderr: String::new() }
    }

    /// Sets stderr.
    pub fn with_stderr(mut self, text: impl Into<String>) -> Self {
        self.stderr = text.into();
        self
    }
}

/// Why a builtin failed; the job ends `failed` with this message as its
/// error.
///
/// Like `anyhow::Error`, it converts from any error type, a `String` or a
/// `&str`, so that builtins can use `?` and `Err("bad input".into())`. For
/// that reason it does not itself implement `std::error::Error` (the blanket
/// conversion would conflict with the standard `From<T> for T`).
pub struct BuiltinError {
    message: String,
}

impl BuiltinError {
    /// An error with this message.
    pub fn msg(message: impl fmt::Display) -> Self {
        Self { message: message.to_string() }
    }

    /// The message, as the job's `error` will show it.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl<E> From<E> for BuiltinError
where
    E: Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
{
    fn from(error: E) -> Self {
        let error: Box<dyn std::error::Error + Send + Sync> = error.into();
        // Keep the cause chain: it is all the user will see.
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Self { message }
    }
}

impl fmt::Display for BuiltinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for BuiltinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BuiltinError({:?})", self.message)
    }
}

/// A job named a builtin this agent does not have.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown builtin {name:?}; this agent knows: {}", known.join(", "))]
pub struct UnknownBuiltin {
    /// The name asked for.
    pub name: String,
    /// The names the agent has, sorted.
    pub known: Vec<String>,
}

/// The boxed form of a registered function.
type BuiltinFn = dyn Fn(Value, BuiltinContext) -> BoxFuture<'static, Result<BuiltinOutput, BuiltinError>> + Send + Sync;

/// One registry entry. `noop` is a variant of its own rather than a boxed
/// function so that running it allocates nothing (no boxed future, no
/// context, no child cancellation token).
#[derive(Clone)]
pub(crate) enum Builtin {
    /// Does nothing and succeeds.
    Noop,
    /// Any other function.
    Func(Arc<BuiltinFn>),
}

/// The registry of builtins an agent can run, by name.
///
/// Cheap to clone (an `Arc` inside); [`Builtins::register`] on a clone copies
/// the table first, so clones never see each other's later registrations.
///
/// ```
/// use crew_core::builtins::{BuiltinOutput, Builtins};
///
/// let mut builtins = Builtins::standard();
/// builtins.register("greet", |args, ctx| async move {
///     let who = args.as_str().ok_or("greet takes a name")?;
///     Ok(BuiltinOutput::stdout(format!("hello {who} from job {}\n", ctx.id)))
/// });
/// assert!(builtins.contains("greet"));
/// ```
#[derive(Clone)]
pub struct Builtins {
    table: Arc<BTreeMap<String, Builtin>>,
}

impl Builtins {
    /// A registry with no builtins at all.
    pub fn empty() -> Self {
        Self { table: Arc::new(BTreeMap::new()) }
    }

    /// The standard builtins every crew agent has:
    ///
    /// - `noop`: does nothing and succeeds;
    /// - `sleep`: waits; its arguments are a number of seconds (`1.5`) or
    ///   `{"seconds": 1.5}`;
    /// - `echo`: writes its arguments to stdout followed by a newline: a JSON
    ///   string as its raw text, anything else as compact JSON.
    pub fn standard() -> Self {
        let mut b = Self::empty();
        Arc::make_mut(&mut b.table).insert("noop".to_owned(), Builtin::Noop);
        b.register("sleep", sleep);
        b.register("echo", |args, _ctx| async move { Ok(echo(args)) });
        b
    }

    /// Registers `f` under `name`, replacing any builtin of that name
    /// (standard ones included).
    ///
    /// `f` takes the job's JSON arguments (`null` when it has none) and its
    /// [`BuiltinContext`]; an `Err` makes the job `failed` with that message.
    /// A panic in `f` also makes the job `failed`; it does not bring the
    /// agent down.
    pub fn register<F, Fut>(&mut self, name: impl Into<String>, f: F) -> &mut Self
    where
        F: Fn(Value, BuiltinContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<BuiltinOutput, BuiltinError>> + Send + 'static,
    {
        let boxed: Arc<BuiltinFn> = Arc::new(move |args, ctx| f(args, ctx).boxed());
        Arc::make_mut(&mut self.table).insert(name.into(), Builtin::Func(boxed));
        self
    }

    /// The same registry with `f` registered under `name` (builder style; see
    /// [`Builtins::register`]).
    pub fn with<F, Fut>(mut self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn(Value, BuiltinContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<BuiltinOutput, BuiltinError>> + Send + 'static,
    {
        self.register(name, f);
        self
    }

    /// The registered names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.table.keys().map(String::as_str).collect()
    }

    /// True when `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.table.contains_key(name)
    }

    /// Finds a builtin by name.
    pub(crate) fn lookup(&self, name: &str) -> Result<&Builtin, UnknownBuiltin> {
        self.table
            .get(name)
            .ok_or_else(|| UnknownBuiltin { name: name.to_owned(), known: self.table.keys().cloned().collect() })
    }

    /// Runs builtin `name` to completion, without the timeout and capture
    /// handling of [`crate::run_job`] (which is what the agent uses).
    /// A panic in the builtin is returned as an error.
    pub async fn call(&self, name: &str, args: Value, ctx: BuiltinContext) -> Result<BuiltinOutput, BuiltinError> {
        match self.lookup(name).map_err(BuiltinError::from)? {
            Builtin::Noop => Ok(BuiltinOutput::empty()),
            Builtin::Func(f) => call_catching(f, args, ctx).await,
        }
    }
}

/// Calls `f`, turning a panic into an error so that a faulty builtin fails
/// its job instead of the agent.
pub(crate) async fn call_catching(
    f: &Arc<BuiltinFn>,
    args: Value,
    ctx: BuiltinContext,
) -> Result<BuiltinOutput, BuiltinError> {
    // `f` itself may panic before returning a future, so the call is inside
    // the unwinding boundary too.
    let fut = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(args, ctx)));
    let result = match fut {
        Ok(fut) => std::panic::AssertUnwindSafe(fut).catch_unwind().await,
        Err(payload) => Err(payload),
    };
    result.unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".to_owned());
        Err(BuiltinError::msg(format!("the builtin panicked: {what}")))
    })
}

impl Default for Builtins {
    /// The standard builtins.
    fn default() -> Self {
        Self::standard()
    }
}

impl fmt::Debug for Builtins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Builtins").field(&self.names()).finish()
    }
}

/// The `sleep` builtin.
async fn sleep(args: Value, ctx: BuiltinContext) -> Result<BuiltinOutput, BuiltinError> {
    let duration = sleep_duration(&args)?;
    tokio::select! {
        () = ctx.cancel.cancelled() => Err(BuiltinError::msg("cancelled")),
        () = tokio::time::sleep(duration) => Ok(BuiltinOutput::empty()),
    }
}

/// Reads `sleep`'s arguments: `1.5` or `{"seconds": 1.5}`.
fn sleep_duration(args: &Value) -> Result<Duration, BuiltinError> {
    let seconds = match args {
        Value::Number(n) => n.as_f64(),
        Value::Object(map) if map.len() == 1 => map.get("seconds").and_then(Value::as_f64),
        _ => None,
    };
    let seconds = seconds.ok_or_else(|| {
        BuiltinError::msg(format!("sleep takes a number of seconds, as 1.5 or {{\"seconds\": 1.5}}; got {args}"))
    })?;
    Duration::try_from_secs_f64(seconds).map_err(|_| {
        BuiltinError::msg(format!(
            "sleep: {seconds} is not a usable number of seconds (it must be finite and not negative)"
        ))
    })
}

/// The `echo` builtin: a string as its raw text, anything else as compact
/// JSON, then a newline.
fn echo(args: Value) -> BuiltinOutput {
    let mut text = match args {
        Value::String(s) => s,
        other => other.to_string(),
    };
    text.push('\n');
    BuiltinOutput::stdout(text)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (a workspace clippy.toml could say `allow-unwrap-in-tests`)
mod tests {
    use super::*;
    use serde_json::json;

    fn context() -> BuiltinContext {
        BuiltinContext {
            id: JobId(5),
            attempt: 2,
            seed: 99,
            env: BTreeMap::from([("K".to_owned(), "V".to_owned())]),
            cancel: CancellationToken::new(),
        }
    }

    #[tokio::test]
    async fn standard_names_and_noop() {
        let b = Builtins::standard();
        assert_eq!(b.names(), vec!["echo", "noop", "sleep"]);
        assert_eq!(b.call("noop", Value::Null, context()).await.unwrap(), BuiltinOutput::empty());
        assert!(matches!(b.lookup("noop"), Ok(Builtin::Noop)));
    }

    #[tokio::test]
    async fn echo_forms() {
        let b = Builtins::standard();
        let out = b.call("echo", json!("hi there"), context()).await.unwrap();
        assert_eq!(out.stdout, "hi there\n");
        assert_eq!(out.stderr, "");
        let out = b.call("echo", json!({"a": [1, 2], "b": "x"}), context()).await.unwrap();
        assert_eq!(out.stdout, "{\"a\":[1,2],\"b\":\"x\"}\n");
        let out = b.call("echo", Value::Null, context()).await.unwrap();
        assert_eq!(out.stdout, "null\n");
    }

    #[test]
    fn sleep_arguments() {
        assert_eq!(sleep_duration(&json!(1.5)).unwrap(), Duration::from_millis(1500));
        assert_eq!(sleep_duration(&json!(2)).unwrap(), Duration::from_secs(2));
        assert_eq!(sleep_duration(&json!({"seconds": 0.25})).unwrap(), Duration::from_millis(250));
        for bad in [json!(null), json!("1"), json!(-1), json!({"secs": 1}), json!({"seconds": 1, "x": 2}), json!(1e300)]
        {
            let err = sleep_duration(&bad).unwrap_err();
            assert!(err.message().starts_with("sleep"), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn sleep_sleeps_and_is_cancellable() {
        let b = Builtins::standard();
        let t = std::time::Instant::now();
        b.call("sleep", json!(0.2), context()).await.unwrap();
        assert!(t.elapsed() >= Duration::from_millis(200));

        let ctx = context();
        let token = ctx.cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            token.cancel();
        });
        let t = std::time::Instant::now();
        let err = b.call("sleep", json!({"seconds": 60}), ctx).await.unwrap_err();
        assert_eq!(err.message(), "cancelled");
        assert!(t.elapsed() < Duration::from_secs(30));
    }

    #[tokio::test]
    async fn unknown_builtin_lists_known_ones() {
        let b = Builtins::standard();
        let err = b.call("nope", Value::Null, context()).await.unwrap_err();
        assert_eq!(err.message(), "unknown builtin \"nope\"; this agent knows: echo, noop, sleep");
        let Err(e) = b.lookup("nope") else { panic!("found nope") };
        assert_eq!(e.known, vec!["echo", "noop", "sleep"]);
    }

    #[tokio::test]
    async fn custom_builtins_see_their_context() {
        let mut b = Builtins::standard();
        b.register("who", |args, ctx| async move {
            let name = args.as_str().ok_or("who takes a string")?;
            let k = ctx.env.get("K").cloned().unwrap_or_default();
            Ok(BuiltinOutput::stdout(format!("{name} {} {} {} {k}", ctx.id, ctx.attempt, ctx.seed)).with_stderr("e"))
        });
        let out = b.call("who", json!("x"), context()).await.unwrap();
        assert_eq!(out.stdout, "x 5 2 99 V");
        assert_eq!(out.stderr, "e");
        let err = b.call("who", json!(1), context()).await.unwrap_err();
        assert_eq!(err.message(), "who takes a string");
    }

    #[tokio::test]
    async fn errors_convert_and_panics_are_caught() {
        let b = Builtins::empty()
            .with("io", |_args, _ctx| async move {
                let e = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
                Err::<BuiltinOutput, _>(e)?;
                Ok(BuiltinOutput::empty())
            })
            .with("boom", |_args, _ctx| async move {
                if true {
                    panic!("kaboom");
                }
                Ok(BuiltinOutput::empty())
            });
        assert_eq!(b.call("io", Value::Null, context()).await.unwrap_err().message(), "gone");
        assert_eq!(b.call("boom", Value::Null, context()).await.unwrap_err().message(), "the builtin panicked: kaboom");
    }

    #[test]
    fn clones_are_independent_and_sync() {
        fn assert_send_sync<T: Send + Sync + Clone>() {}
        assert_send_sync::<Builtins>();
        let a = Builtins::standard();
        let mut b = a.clone();
        b.register("extra", |_args, _ctx| async move { Ok(BuiltinOutput::empty()) });
        assert!(b.contains("extra"));
        assert!(!a.contains("extra"));
        assert_eq!(format!("{a:?}"), "Builtins([\"echo\", \"noop\", \"sleep\"])");
    }
}
