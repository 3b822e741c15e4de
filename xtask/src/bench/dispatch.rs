//! Figure 9: what the scheduler costs per dispatch, from 10 to 10,000
//! slots, measured in its sans-I/O form with simulated agents.
//!
//! Every slot is connected and busy, the queue is long, and the agents
//! finish their jobs in turn: each event is one `finished` (the output
//! delivered) and the `Assign` it makes room for. The clock advances a
//! second per event, so the workers look like workers of long jobs and each
//! holds `1 + prefetch` jobs, as on a cluster; the time per event is the
//! cost of one dispatch. The baseline is the same at 10 slots, measured
//! alternately: a flat curve is a ratio near 1.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::ensure;
use crew_core::job::{JobId, JobSpec};
use crew_core::output::{Output, Status};
use crew_scheduler::{Action, Scheduler, SlotConfig, SlotId, SlotLimits};

use super::measure::progress;
use super::report::{Row, Target, Unit};

/// The slot counts of the curve; the first is the baseline.
const SLOTS: [usize; 4] = [10, 100, 1_000, 10_000];

/// The bound at 10,000 slots, in µs per dispatch.
const BOUND_MICROS: f64 = 5.0;

/// The rows of figure 9: one per slot count.
pub(super) fn curve(runs: usize, quick: bool) -> anyhow::Result<Vec<Row>> {
    let events = if quick { 20_000 } else { 200_000 };
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); SLOTS.len()];
    for run in 1..=runs {
        let mut shown = Vec::new();
        for (i, &slots) in SLOTS.iter().enumerate() {
            let micros = per_dispatch(slots, events)?;
            samples[i].push(micros);
            shown.push(format!("{slots}: {micros:.2} µs"));
        }
        progress("9", run, runs, shown.join(", "));
    }
    let base = samples[0].clone();
    let ids = ["9a", "9b", "9c", "9d"];
    Ok(SLOTS
        .iter()
        .zip(samples)
        .zip(ids)
        .map(|((&slots, crew), id)| Row {
            id,
            figure: format!("scheduler cost per dispatch, {slots} busy slots (simulated agents)"),
            unit: Unit::Micros,
            crew,
            baseline: base.clone(),
            baseline_is: "9a (10 slots), measured in the same runs".into(),
            target: if slots == 10_000 { Target::Below(BOUND_MICROS) } else { Target::Info },
        })
        .collect())
}

/// Mean µs per dispatch over `events` finish-and-assign events on `slots`
/// busy slots.
fn per_dispatch(slots: usize, events: usize) -> anyhow::Result<f64> {
    let base = Instant::now();
    let mut tick = 0u64;
    let mut now = || {
        tick += 1;
        base + Duration::from_secs(tick)
    };
    let mut sched = Scheduler::new();
    let configs = (0..slots)
        .map(|i| SlotConfig {
            name: format!("s{i}"),
            class: "sim".into(),
            tags: crew_core::Tags::default(),
            limits: SlotLimits::default(),
        })
        .collect();
    let ids = sched.recruit(configs, now());
    // Enough jobs that the queue never empties while measuring.
    let spec = Arc::new(JobSpec::builtin("noop", serde_json::Value::Null));
    let total = slots * 2 + events + 1;
    for id in 1..=total as u64 {
        sched.submit(JobId(id), Arc::clone(&spec), id, now()).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    for &slot in &ids {
        ensure!(sched.connected(slot, now()), "slot {slot:?} was not launching");
    }
    // The agents: what each holds, in order.
    let mut held: Vec<VecDeque<JobId>> = vec![VecDeque::new(); slots];
    let mut actions = Vec::new();
    let mut absorb = |sched: &mut Scheduler, held: &mut Vec<VecDeque<JobId>>| {
        sched.drain_actions_into(&mut actions);
        for a in actions.drain(..) {
            if let Action::Assign { slot, job, .. } = a {
                held[slot.0 as usize].push_back(job);
            }
        }
    };
    absorb(&mut sched, &mut held);
    ensure!(held.iter().all(|h| !h.is_empty()), "a connected slot got no job");
    let output =
        |job: JobId| Output::without_run(job, None, crew_core::Tags::default(), 0, Status::Succeeded, String::new());
    let begin = Instant::now();
    for k in 0..events {
        let slot = k % slots;
        let Some(job) = held[slot].pop_front() else { anyhow::bail!("slot {slot} ran dry") };
        sched.finished(SlotId(slot as u32), job, output(job), now());
        absorb(&mut sched, &mut held);
    }
    let elapsed = begin.elapsed();
    Ok(elapsed.as_secs_f64() * 1e6 / events as f64)
}
