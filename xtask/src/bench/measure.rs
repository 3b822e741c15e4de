//! The figures: each measured `runs` times, alternating with its baseline.
//!
//! Library figures embed a [`Controller`] in this process (a current-thread
//! Tokio runtime, as `crew run` has) with `crew worker` from the release
//! `crew` binary as the agent, and launch the workers before the clock
//! starts unless the figure is about launching. `crew run` figures time the
//! binary as a user would run it, output to `/dev/null`, in a scratch folder
//! (its default store `.crew/store` lands there).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use crew_controller::{AgentCommand, Controller, ControllerConfig, Recruit, TlsMode};
use crew_core::{JobSpec, Output};
use crew_scheduler::{SlotFilter, SlotLimits};
use crew_worker_local::LocalWorker;

use super::report::{self, Row, Target, Unit};
use super::{echo, store};
use crate::bench::Options;

/// Round trips run before the timed ones, for crew and the baseline alike.
pub(super) const WARM_UP: usize = 100;

/// Round trips timed in a row before figure 3 turns to the next of crew in
/// plaintext, crew over TLS and the raw ping-pong.
const ROUND_TRIP_BLOCK: usize = 500;

/// Longest wait for any one output, worker or peer before the bench gives up.
const PATIENCE: Duration = Duration::from_secs(120);

/// How long a `sleep` job sleeps, in seconds (figure 4).
const SLEEP_SECONDS: f64 = 0.05;

/// Job counts and repetitions of each figure.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    million: usize,
    shell_jobs: usize,
    noop_jobs: usize,
    round_trips: usize,
    sleep_jobs: usize,
    launches: usize,
    large_output: u64,
}

const FULL: Sizes = Sizes {
    million: 1_000_000,
    shell_jobs: 10_000,
    noop_jobs: 100_000,
    round_trips: 10_000,
    sleep_jobs: 200,
    launches: 20,
    large_output: 1 << 30,
};

const QUICK: Sizes = Sizes {
    million: 100_000,
    shell_jobs: 1_000,
    noop_jobs: 10_000,
    round_trips: 1_000,
    sleep_jobs: 20,
    launches: 5,
    large_output: 64 << 20,
};

/// Measures every figure and prints the report.
pub(super) fn run(opts: Options) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("xtask: warning: this xtask is a debug build; the library figures measure debug code");
    }
    let sizes = if opts.quick { QUICK } else { FULL };
    let crew = crew_binary()?;
    let scratch = Scratch::create()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start a runtime")?;
    let bench = Bench { crew, dir: scratch.0.clone(), runs: opts.runs, sizes };
    let mut rows = Vec::new();
    if opts.wants(1) {
        rows.push(bench.shell_jobs()?);
    }
    if opts.wants(2) {
        let noop_library = rt.block_on(bench.noop_library())?;
        let noop_cli = bench.noop_cli(&noop_library)?;
        rows.extend([noop_library, noop_cli]);
    }
    if opts.wants(3) {
        rows.extend(bench.round_trip()?);
    }
    if opts.wants(4) {
        rows.extend(rt.block_on(bench.sleep_library())?);
        rows.push(bench.sleep_cli()?);
    }
    if opts.wants(5) {
        rows.push(rt.block_on(bench.launch_to_ready())?);
    }
    drop(rt);
    if opts.wants(6) {
        rows.extend(bench.large_output()?);
    }
    if opts.wants(7) {
        let chains = if opts.quick { 10 } else { 100 };
        rows.extend(super::pipeline::pipeline(&bench.crew, &bench.dir, chains, bench.runs)?);
    }
    if opts.wants(8) {
        let rt =
            tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start a runtime")?;
        rows.extend(bench.million_cli(&rt)?);
    }
    if opts.wants(9) {
        rows.extend(super::dispatch::curve(bench.runs, opts.quick)?);
    }
    if opts.wants(10) {
        rows.extend(super::daemon::daemon(&bench.crew, &bench.dir, opts.quick, bench.runs)?);
    }
    if opts.json {
        println!("{}", report::json(&rows, opts));
    } else {
        print!("{}", report::table(&rows, opts));
    }
    Ok(())
}

/// The `crew` binary next to this one (`cargo build --release -p crew-cli`
/// puts both in the same folder).
fn crew_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the xtask executable")?;
    let crew = exe
        .parent()
        .map(|d| d.join(format!("crew{}", std::env::consts::EXE_SUFFIX)))
        .context("the xtask executable has no folder")?;
    ensure!(
        crew.is_file(),
        "{} does not exist: run `cargo xtask bench` (it builds crew), or `cargo build --release -p crew-cli`",
        crew.display()
    );
    Ok(crew)
}

/// A scratch folder, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn create() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("crew-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What every figure needs.
struct Bench {
    crew: PathBuf,
    dir: PathBuf,
    runs: usize,
    sizes: Sizes,
}

impl Bench {
    /// Writes a job file of `n` copies of `line`.
    fn job_file(&self, name: &str, line: &str, n: usize) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(name);
        let mut text = String::with_capacity((line.len() + 1) * n);
        for _ in 0..n {
            text.push_str(line);
            text.push('\n');
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }

    /// `crew run --workers W --json FILE > /dev/null`.
    fn crew_run(&self, workers: u32, file: &Path) -> Command {
        let mut c = Command::new(&self.crew);
        c.args(["run", "--workers", &workers.to_string(), "--json"]).arg(file);
        c
    }

    /// A controller with `count` local workers, launched and connected.
    async fn controller(&self, count: u32) -> anyhow::Result<Controller> {
        self.controller_tls(count, TlsMode::Auto).await
    }

    /// The same, with agent connections in the given TLS mode.
    async fn controller_tls(&self, count: u32, tls: TlsMode) -> anyhow::Result<Controller> {
        let mut config = ControllerConfig::new(AgentCommand::crew(self.crew.to_string_lossy()));
        config.tls = tls;
        let controller = Controller::start(config).await?;
        let mut recruit = Recruit::new(Arc::new(LocalWorker::new()), count);
        recruit.limits = SlotLimits::default();
        controller.recruit(recruit)?;
        controller.launch(&SlotFilter::default(), count as usize);
        let deadline = Instant::now() + PATIENCE;
        while !controller.status().slots.iter().all(|s| s.state == crew_controller::SlotCondition::Idle) {
            ensure!(Instant::now() < deadline, "the workers did not connect within {PATIENCE:?}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(controller)
    }

    /// Figure 1: 10,000 `true` jobs on 2 workers, `crew run` against
    /// `xargs -P 2`.
    fn shell_jobs(&self) -> anyhow::Result<Row> {
        let n = self.sizes.shell_jobs;
        let file = self.job_file("true.txt", "true", n)?;
        let (mut crew, mut base) = (Vec::new(), Vec::new());
        for i in 1..=self.runs {
            let c = time(self.crew_run(2, &file).current_dir(&self.dir))?;
            let b = time(&mut xargs(2, &file, &self.dir)?)?;
            progress("1", i, self.runs, format!("crew run {c:.3} s, xargs {b:.3} s"));
            crew.push(c);
            base.push(b);
        }
        Ok(Row {
            id: "1",
            figure: format!("{} `true` jobs, 2 workers (crew run)", thousands(n)),
            unit: Unit::Seconds,
            crew,
            baseline: base,
            baseline_is: "xargs -P 2 -d '\\n' -n 1 sh -c < FILE (each line through sh -c, as crew runs it)".into(),
            target: Target::RatioAtMost(1.3),
        })
    }

    /// Figure 2a: `noop` throughput through the library, against raw TCP
    /// echoes of the same frames with the same window.
    async fn noop_library(&self) -> anyhow::Result<Row> {
        let n = self.sizes.noop_jobs;
        let (request, reply) = echo::noop_frame_sizes()?;
        // The window crew reaches on no-op jobs: one running and
        // `AHEAD_MAX` sent ahead.
        let window = crew_scheduler::AHEAD_MAX as usize + 1;
        let (mut crew, mut base) = (Vec::new(), Vec::new());
        for i in 1..=self.runs {
            let controller = self.controller(2).await?;
            let specs: Vec<JobSpec> = (0..n).map(|_| JobSpec::builtin("noop", serde_json::Value::Null)).collect();
            let begin = Instant::now();
            controller.send_many(specs)?;
            let outputs = receive_n(&controller, n).await;
            let elapsed = begin.elapsed();
            controller.close().await;
            check_outputs(&outputs?, n)?;
            let c = n as f64 / elapsed.as_secs_f64();
            let b = echo::pipelined_rate(2, window, n, request, reply).await?;
            progress("2a", i, self.runs, format!("crew {c:.0} jobs/s, raw TCP {b:.0} msgs/s"));
            crew.push(c);
            base.push(b);
        }
        Ok(Row {
            id: "2a",
            figure: format!("{} noop jobs, 2 workers (library)", thousands(n)),
            unit: Unit::JobsPerSecond,
            crew,
            baseline: base,
            baseline_is: format!(
                "raw loopback TCP echo to 2 child processes, {window} frames in flight each \
                 ({request} B out, {reply} B back: a noop's Run and Done), tokio both ends"
            ),
            target: Target::AtLeast(100_000.0),
        })
    }

    /// Figure 2b: the same through `crew run`, launch and parsing included;
    /// the baseline is the library figure.
    fn noop_cli(&self, library: &Row) -> anyhow::Result<Row> {
        let n = self.sizes.noop_jobs;
        let file = self.job_file("noop.jsonl", r#"{"builtin":"noop"}"#, n)?;
        let mut crew = Vec::new();
        for i in 1..=self.runs {
            let c = n as f64 / time(self.crew_run(2, &file).current_dir(&self.dir))?;
            progress("2b", i, self.runs, format!("crew run {c:.0} jobs/s"));
            crew.push(c);
        }
        Ok(Row {
            id: "2b",
            figure: format!("{} noop jobs, 2 workers (crew run, with launch)", thousands(n)),
            unit: Unit::JobsPerSecond,
            crew,
            baseline: library.crew.clone(),
            baseline_is: "figure 2a (the library, workers launched beforehand)".into(),
            target: Target::AtLeast(100_000.0),
        })
    }

    /// Figure 3: one `noop` round trip on a warm worker, against a raw TCP
    /// request/response with a child process, both with their two ends
    /// placed alike.
    ///
    /// On this 2-vCPU machine a round trip's time hangs first on where the
    /// scheduler puts the two ends: on one CPU a wake-up is a context
    /// switch (a raw trip takes ~17 µs); on two, it is an interrupt to a
    /// halted vCPU (~50 µs). Left to itself, the scheduler runs crew's
    /// controller and agent apart and the raw peer, which does almost
    /// nothing, beside its client, so that unpinned figures (3e) compare
    /// two layouts, not two programs. 3a-3c pin the controller (the bench)
    /// to one CPU and the agent (the peer) to another, the layout crew
    /// gets by itself and any machine with a core to spare gives it; 3d
    /// puts all on one CPU, where the wake-ups are cheapest and crew's own
    /// code weighs most.
    fn round_trip(&self) -> anyhow::Result<Vec<Row>> {
        let n = self.sizes.round_trips;
        let (request, reply) = echo::noop_frame_sizes()?;
        let cpus = allowed_cpus()?;
        let (first, last) = match (cpus.first(), cpus.last()) {
            (Some(&f), Some(&l)) => (f, l),
            _ => bail!("this process may run on no CPU"),
        };
        let (mut med, mut p99, mut base_med, mut base_p99) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut tls_med, mut one_med, mut one_base, mut free_med, mut free_base) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 1..=self.runs {
            // The agents and the peer inherit the CPU of the thread that
            // starts them; the bench moves to its own CPU after.
            let [times, tls_times, raw] = on_own_thread(Some(last), self.round_trips(n, request, reply, Some(first)))?;
            let [one, _, one_raw] = on_own_thread(Some(last), self.round_trips(n, request, reply, None))?;
            let [free, _, free_raw] = on_own_thread(None, self.round_trips(n, request, reply, None))?;
            let (m, p, bm, bp) = (
                report::median(&times),
                report::percentile(&times, 99.0),
                report::median(&raw),
                report::percentile(&raw, 99.0),
            );
            let t = report::median(&tls_times);
            let (om, ob) = (report::median(&one), report::median(&one_raw));
            let (fm, fb) = (report::median(&free), report::median(&free_raw));
            progress(
                "3",
                i,
                self.runs,
                format!(
                    "apart: crew {m:.1}/{p:.1} µs, raw TCP {bm:.1}/{bp:.1} µs (median/p99), crew over TLS {t:.1} µs; \
                     one CPU: crew {om:.1} µs, raw {ob:.1} µs; unpinned: crew {fm:.1} µs, raw {fb:.1} µs"
                ),
            );
            med.push(m);
            p99.push(p);
            base_med.push(bm);
            base_p99.push(bp);
            tls_med.push(t);
            one_med.push(om);
            one_base.push(ob);
            free_med.push(fm);
            free_base.push(fb);
        }
        let baseline_is = format!(
            "raw loopback TCP request/response with a child process ({request} B out, {reply} B back), tokio both ends, \
             in blocks of {ROUND_TRIP_BLOCK} alternating with crew's; bench on CPU {first}, peer on CPU {last}"
        );
        Ok(vec![
            Row {
                id: "3a",
                figure: format!("noop round trip, warm worker on another CPU: median of {}", thousands(n)),
                unit: Unit::Micros,
                crew: med.clone(),
                baseline: base_med,
                baseline_is: baseline_is.clone(),
                target: Target::RatioAtMost(1.3),
            },
            Row {
                id: "3b",
                figure: "  3a's p99".into(),
                unit: Unit::Micros,
                crew: p99,
                baseline: base_p99,
                baseline_is,
                target: Target::Info,
            },
            Row {
                id: "3c",
                figure: "  3a with TLS (tls = always): median".into(),
                unit: Unit::Micros,
                crew: tls_med,
                baseline: med,
                baseline_is: "figure 3a (plaintext on loopback)".into(),
                target: Target::Info,
            },
            Row {
                id: "3d",
                figure: "  3a with both ends on one CPU: median".into(),
                unit: Unit::Micros,
                crew: one_med,
                baseline: one_base,
                baseline_is: format!("3a's baseline, all on CPU {last}"),
                target: Target::Info,
            },
            Row {
                id: "3e",
                figure: "  3a unpinned (the scheduler places both ends): median".into(),
                unit: Unit::Micros,
                crew: free_med,
                baseline: free_base,
                baseline_is: "3a's baseline, unpinned".into(),
                target: Target::Info,
            },
        ])
    }

    /// `n` timed round trips (µs) each of crew in plaintext, crew over TLS
    /// and the raw ping-pong, in alternating blocks of [`ROUND_TRIP_BLOCK`]
    /// so that all three see the machine in the same state (a noisy
    /// neighbour, a CPU's frequency), after [`WARM_UP`] untimed trips each.
    /// With `cpu`, the calling thread moves to that CPU once the agents and
    /// the peer are started.
    async fn round_trips(
        &self,
        n: usize,
        request: usize,
        reply: usize,
        cpu: Option<usize>,
    ) -> anyhow::Result<[Vec<f64>; 3]> {
        let plain = self.controller_tls(1, TlsMode::Auto).await?;
        let tls = self.controller_tls(1, TlsMode::Always).await?;
        let mut raw = echo::PingPong::start(request, reply).await?;
        if let Some(cpu) = cpu {
            pin_this_thread(cpu)?;
        }
        for _ in 0..WARM_UP {
            crew_trip(&plain).await?;
            crew_trip(&tls).await?;
            raw.trip().await?;
        }
        let mut times = [Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n)];
        while times[0].len() < n {
            let block = ROUND_TRIP_BLOCK.min(n - times[0].len());
            for _ in 0..block {
                times[0].push(micros(crew_trip(&plain).await?));
            }
            for _ in 0..block {
                times[1].push(micros(crew_trip(&tls).await?));
            }
            for _ in 0..block {
                times[2].push(micros(raw.trip().await?));
            }
        }
        plain.close().await;
        tls.close().await;
        raw.finish().await?;
        Ok(times)
    }

    /// The ideal wall time of figure 4: the jobs evenly over 4 workers.
    fn sleep_ideal(&self) -> f64 {
        self.sizes.sleep_jobs as f64 * SLEEP_SECONDS / 4.0
    }

    /// Figure 4a: `sleep 0.05` jobs on 4 workers through the library,
    /// workers launched beforehand, against the ideal.
    /// Also row 4c: the same crew samples against the machine's floor, four
    /// shell loops running the jobs' commands side by side, measured
    /// alternately with crew: what 200 process starts cost here before crew
    /// does anything.
    async fn sleep_library(&self) -> anyhow::Result<Vec<Row>> {
        let n = self.sizes.sleep_jobs;
        let loop_line = format!("for i in $(seq {}); do sleep {SLEEP_SECONDS}; done", n / 4);
        let (mut crew, mut floor) = (Vec::new(), Vec::new());
        for i in 1..=self.runs {
            let controller = self.controller(4).await?;
            let specs: Vec<JobSpec> = (0..n).map(|_| JobSpec::shell(format!("sleep {SLEEP_SECONDS}"))).collect();
            let begin = Instant::now();
            controller.send_many(specs)?;
            let outputs = receive_n(&controller, n).await;
            let elapsed = begin.elapsed().as_secs_f64();
            controller.close().await;
            check_outputs(&outputs?, n)?;
            let f = time_loops(&loop_line, 4, &self.dir)?;
            progress("4a", i, self.runs, format!("crew {elapsed:.3} s, 4 shell loops {f:.3} s"));
            crew.push(elapsed);
            floor.push(f);
        }
        let floor_row = Row {
            id: "4c",
            figure: format!("  4a against the machine's floor ({n} sleeps in 4 shell loops)"),
            unit: Unit::Seconds,
            crew: crew.clone(),
            baseline: floor,
            baseline_is: format!("4 × sh -c '{loop_line}' side by side"),
            target: Target::Info,
        };
        Ok(vec![
            Row {
                id: "4a",
                figure: format!("{n} × sleep {SLEEP_SECONDS}, 4 workers (library)"),
                unit: Unit::Seconds,
                crew,
                baseline: vec![self.sleep_ideal()],
                baseline_is: "the ideal: jobs × 0.05 s / 4 workers".into(),
                target: Target::RatioAtMost(1.05),
            },
            floor_row,
        ])
    }

    /// Figure 4b: the same through `crew run`, worker launch included,
    /// against `xargs -P 4` on the same lines: what starting 200 shells
    /// costs on this machine with nothing else.
    fn sleep_cli(&self) -> anyhow::Result<Row> {
        let n = self.sizes.sleep_jobs;
        let file = self.job_file("sleep.txt", &format!("sleep {SLEEP_SECONDS}"), n)?;
        let (mut crew, mut base) = (Vec::new(), Vec::new());
        for i in 1..=self.runs {
            let c = time(self.crew_run(4, &file).current_dir(&self.dir))?;
            let b = time(&mut xargs(4, &file, &self.dir)?)?;
            progress("4b", i, self.runs, format!("crew run {c:.3} s, xargs {b:.3} s"));
            crew.push(c);
            base.push(b);
        }
        Ok(Row {
            id: "4b",
            figure: format!("{n} × sleep {SLEEP_SECONDS}, 4 workers (crew run, with launch)"),
            unit: Unit::Seconds,
            crew,
            baseline: base,
            baseline_is: "xargs -P 4 -d '\\n' -n 1 sh -c < FILE (the same lines)".into(),
            target: Target::Info,
        })
    }

    /// Figure 5: a local worker from `launch` to connected and idle, against
    /// spawning and waiting for `crew --version`.
    async fn launch_to_ready(&self) -> anyhow::Result<Row> {
        let n = self.sizes.launches;
        let (mut crew, mut base) = (Vec::new(), Vec::new());
        for i in 1..=self.runs {
            let config = ControllerConfig::new(AgentCommand::crew(self.crew.to_string_lossy()));
            let controller = Controller::start(config).await?;
            controller.recruit(Recruit::new(Arc::new(LocalWorker::new()), 1))?;
            // One launch to warm the page cache, then the timed ones.
            let mut times = Vec::with_capacity(n);
            for k in 0..=n {
                let c = controller.clone();
                let t = tokio::task::spawn_blocking(move || launch_once(&c))
                    .await
                    .context("the launch timer panicked")??;
                if k > 0 {
                    times.push(millis(t));
                }
            }
            controller.close().await;
            let mut spawn = Vec::with_capacity(n);
            for _ in 0..n {
                spawn.push(millis(time_version(&self.crew)?));
            }
            let (c, b) = (report::median(&times), report::median(&spawn));
            progress("5", i, self.runs, format!("launch → ready {c:.2} ms, crew --version {b:.2} ms"));
            crew.push(c);
            base.push(b);
        }
        Ok(Row {
            id: "5",
            figure: format!("local worker launch → ready: median of {n}"),
            unit: Unit::Millis,
            crew,
            baseline: base,
            baseline_is: "spawning `crew --version` and waiting for it to exit".into(),
            target: Target::Below(20.0),
        })
    }
}

impl Bench {
    /// Figure 8: a million no-op jobs through `crew run --workers 2`, with
    /// the run's peak memory. The time's baseline is the raw TCP echo of as
    /// many frames of the same sizes (figure 2a's baseline, here as a
    /// time); the memory's is `crew run` of a one-line file, measured
    /// alternately.
    fn million_cli(&self, rt: &tokio::runtime::Runtime) -> anyhow::Result<Vec<Row>> {
        let n = self.sizes.million;
        let file = self.job_file("million.jsonl", r#"{"builtin":"noop"}"#, n)?;
        let one = self.job_file("one.jsonl", r#"{"builtin":"noop"}"#, 1)?;
        let (request, reply) = echo::noop_frame_sizes()?;
        let window = crew_scheduler::AHEAD_MAX as usize + 1;
        let (mut secs, mut echo_secs, mut peak, mut idle, mut per_job) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 1..=self.runs {
            let (c, rss) = time_with_peak(self.crew_run(2, &file).current_dir(&self.dir))?;
            let (_, idle_rss) = time_with_peak(self.crew_run(2, &one).current_dir(&self.dir))?;
            let rate = rt.block_on(echo::pipelined_rate(2, window, n, request, reply))?;
            let b = n as f64 / rate;
            let job_bytes = rss.saturating_sub(idle_rss) as f64 / n as f64;
            progress(
                "8",
                i,
                self.runs,
                format!(
                    "crew run {c:.2} s, raw TCP {b:.2} s; peak RSS {:.1} MiB, one-job run {:.1} MiB: {job_bytes:.0} B per job",
                    mib(rss),
                    mib(idle_rss)
                ),
            );
            secs.push(c);
            echo_secs.push(b);
            peak.push(mib(rss));
            idle.push(mib(idle_rss));
            per_job.push(job_bytes);
        }
        let what = format!("{} noop jobs, 2 workers (crew run, with launch)", thousands(n));
        Ok(vec![
            Row {
                id: "8a",
                figure: what.clone(),
                unit: Unit::Seconds,
                crew: secs,
                baseline: echo_secs,
                baseline_is: format!(
                    "raw loopback TCP echo of as many frames ({request} B out, {reply} B back) to 2 child \
                     processes, {window} in flight each"
                ),
                target: Target::Below(if self.sizes.million >= 1_000_000 { 15.0 } else { 1.5 }),
            },
            Row {
                id: "8b",
                figure: "  8a's peak RSS above a one-job run, per job".into(),
                unit: Unit::Bytes,
                crew: per_job,
                baseline: Vec::new(),
                baseline_is: "(none: the issue's bound)".into(),
                target: Target::Below(512.0),
            },
            Row {
                id: "8c",
                figure: "  8a's peak RSS".into(),
                unit: Unit::Mib,
                crew: peak,
                baseline: idle,
                baseline_is: "crew run of one noop job, measured alternately".into(),
                target: Target::Info,
            },
        ])
    }

    /// Figure 6: a large job output through the local store, and through
    /// an S3 store when `CREW_BENCH_S3` names one.
    fn large_output(&self) -> anyhow::Result<Vec<Row>> {
        let bytes = self.sizes.large_output;
        let local = store::StoreUnderTest::Local(self.dir.join("store6"));
        let mut rows = store::large_output(&self.crew, &self.dir, &local, bytes, self.runs, ["6a", "6b", "6c"])?;
        if let Some(url) = std::env::var("CREW_BENCH_S3").ok().filter(|u| !u.is_empty()) {
            let s3 = store::StoreUnderTest::S3(url.trim_end_matches('/').to_owned());
            rows.extend(store::large_output(&self.crew, &self.dir, &s3, bytes, self.runs, ["6d", "6e", "6f"])?);
        }
        Ok(rows)
    }
}

/// Launches the one slot, waits until it is idle, then shuts it down and
/// waits until it is down again; returns the time to idle. Blocking: it
/// polls every 50 µs from its own thread, which a Tokio timer (1 ms
/// granularity) could not, and without spinning a runtime thread the agent
/// needs.
fn launch_once(controller: &Controller) -> anyhow::Result<Duration> {
    let state = || controller.status().slots.first().map(|s| s.state);
    ensure!(
        state() == Some(crew_controller::SlotCondition::Down),
        "the slot is {:?}, not down, before a launch",
        state()
    );
    let begin = Instant::now();
    ensure!(controller.launch(&SlotFilter::default(), 1) == 1, "the slot did not launch");
    while state() != Some(crew_controller::SlotCondition::Idle) {
        ensure!(begin.elapsed() < PATIENCE, "the worker did not connect within {PATIENCE:?}");
        std::thread::sleep(Duration::from_micros(50));
    }
    let ready = begin.elapsed();
    controller.shutdown(&SlotFilter::default(), true);
    while state() != Some(crew_controller::SlotCondition::Down) {
        ensure!(begin.elapsed() < 2 * PATIENCE, "the worker did not stop within {PATIENCE:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(ready)
}

/// Receives `n` outputs.
async fn receive_n(controller: &Controller, n: usize) -> anyhow::Result<Vec<Output>> {
    let mut outputs = Vec::with_capacity(n);
    while outputs.len() < n {
        match controller.receive_wait(Some(PATIENCE)).await {
            Some(o) => {
                outputs.push(o);
                outputs.extend(controller.receive_all());
            }
            None => bail!("only {} of {n} outputs arrived (none for {PATIENCE:?})", outputs.len()),
        }
    }
    Ok(outputs)
}

/// Fails unless there are `n` outputs, all successes.
fn check_outputs(outputs: &[Output], n: usize) -> anyhow::Result<()> {
    ensure!(outputs.len() == n, "{} outputs for {n} jobs", outputs.len());
    if let Some(bad) = outputs.iter().find(|o| !o.succeeded()) {
        bail!("a job did not succeed: {:?} ({})", bad.status, bad.error.as_deref().unwrap_or("no error message"));
    }
    Ok(())
}

/// Runs `work` to its end on a new thread with a current-thread runtime of
/// its own, pinned to `cpu` when given: so is every process started from
/// it (a child inherits the CPU set of the thread that forks it), while the
/// bench's other threads keep theirs.
fn on_own_thread<T: Send>(
    cpu: Option<usize>,
    work: impl std::future::Future<Output = anyhow::Result<T>> + Send,
) -> anyhow::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                if let Some(cpu) = cpu {
                    pin_this_thread(cpu)?;
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("cannot start a runtime")?;
                rt.block_on(work)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("a bench thread panicked"))?
    })
}

/// The CPUs this process may run on, in increasing order.
fn allowed_cpus() -> anyhow::Result<Vec<usize>> {
    // SAFETY: `cpu_set_t` is plain data the call fills; its size is given.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    ensure!(r == 0, "cannot read this process's CPU set: {}", std::io::Error::last_os_error());
    Ok((0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect())
}

/// Pins the calling thread to `cpu`.
fn pin_this_thread(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: as in `allowed_cpus`; pid 0 is the calling thread.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    ensure!(r == 0, "cannot pin the bench to CPU {cpu}: {}", std::io::Error::last_os_error());
    Ok(())
}

/// One `noop` sent through `controller` and its output received: the time.
async fn crew_trip(controller: &Controller) -> anyhow::Result<Duration> {
    let begin = Instant::now();
    controller.send(JobSpec::builtin("noop", serde_json::Value::Null))?;
    let output = controller.receive_wait(Some(PATIENCE)).await;
    let elapsed = begin.elapsed();
    check_outputs(&[output.context("no output within the patience")?], 1)?;
    Ok(elapsed)
}

/// Runs a command to completion, stdout to `/dev/null`; its wall time in
/// seconds. Fails with its stderr when it fails.
fn time(cmd: &mut Command) -> anyhow::Result<f64> {
    let shown = format!("{cmd:?}");
    let begin = Instant::now();
    let out =
        cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output().with_context(|| format!("cannot start {shown}"))?;
    let elapsed = begin.elapsed().as_secs_f64();
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(10).collect();
        bail!("{shown} failed ({}):\n{}", out.status, tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
    Ok(elapsed)
}

/// Runs a command to completion as [`time`] does; also its peak resident
/// set size in bytes (sampled: see [`store::run_sampled`]).
fn time_with_peak(cmd: &mut Command) -> anyhow::Result<(f64, u64)> {
    let (wall, kib) = store::run_sampled(cmd, Stdio::null(), true, PATIENCE)?;
    Ok((wall, kib * 1024))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// `xargs -P PARALLEL -d '\n' -n 1 sh -c < FILE`: every line through
/// `sh -c`, as crew runs a plain line.
fn xargs(parallel: u32, file: &Path, dir: &Path) -> anyhow::Result<Command> {
    let input = File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let mut c = Command::new("xargs");
    c.args(["-P", &parallel.to_string(), "-d", "\n", "-n", "1", "sh", "-c"]).stdin(input).current_dir(dir);
    Ok(c)
}

/// Wall time of `copies` shells running `line` side by side, in seconds.
fn time_loops(line: &str, copies: usize, dir: &Path) -> anyhow::Result<f64> {
    let begin = Instant::now();
    let children: Vec<_> = (0..copies)
        .map(|_| Command::new("sh").args(["-c", line]).current_dir(dir).stdout(Stdio::null()).spawn())
        .collect::<Result<_, _>>()
        .context("cannot start sh")?;
    for mut child in children {
        let status = child.wait().context("cannot wait for sh")?;
        ensure!(status.success(), "`sh -c '{line}'` failed ({status})");
    }
    Ok(begin.elapsed().as_secs_f64())
}

/// Time to spawn `crew --version` and wait for it.
fn time_version(crew: &Path) -> anyhow::Result<Duration> {
    let begin = Instant::now();
    let status = Command::new(crew)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("cannot start {}", crew.display()))?;
    let elapsed = begin.elapsed();
    ensure!(status.success(), "`crew --version` failed ({status})");
    Ok(elapsed)
}

pub(super) fn progress(id: &str, run: usize, runs: usize, what: String) {
    eprintln!("xtask: figure {id}, run {run}/{runs}: {what}");
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `10000` as `10,000`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(10_000), "10,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
