//! The timers: deadlines (heartbeats, idle and launch timeouts, resume
//! windows) and the periodic probe of launched workers through their class.

use super::*;

/// Scheduler deadlines, heartbeats and silent workers.
pub(crate) async fn timer_loop(shared: Arc<Shared>) {
    let hb = shared.config.heartbeat;
    let hb_ms = hb.as_millis() as u64;
    let lost_ms = hb_ms.saturating_mul(u64::from(shared.config.heartbeat_misses.max(1)));
    loop {
        let deadline = {
            let core = lock(&shared.core);
            core.sched.next_deadline()
        };
        let now = Instant::now();
        let mut wait = hb / 2;
        if let Some(d) = deadline {
            wait = wait.min(d.saturating_duration_since(now));
        }
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = shared.timer_wake.notified() => {}
        }
        let mut silent = Vec::new();
        {
            let mut core = lock(&shared.core);
            let now_ms = shared.now_ms();
            for rt in &core.slots {
                if let Some(conn) = &rt.conn {
                    if now_ms.saturating_sub(conn.last_recv_ms.load(Ordering::Relaxed)) > lost_ms {
                        silent.push(conn.clone());
                    } else if now_ms.saturating_sub(conn.last_sent_ms.load(Ordering::Relaxed)) >= hb_ms {
                        conn.send(&ControllerMsg::Heartbeat, now_ms);
                    }
                }
            }
            core.sched.tick(Instant::now());
            shared.apply(&mut core);
        }
        for conn in silent {
            warn!(slot = %conn.name, "worker stopped answering; treating it as lost");
            shared.on_closed(
                &conn,
                &format!("no heartbeat for {}", humantime::format_duration(Duration::from_millis(lost_ms))),
            );
        }
    }
}

/// Asks each class about its launched agents.
pub(crate) async fn probe_loop(shared: Arc<Shared>) {
    let mut last: HashMap<usize, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        // Handles per class, for slots that are launching, up or stopping.
        let mut work: HashMap<usize, ProbeBatch> = HashMap::new();
        {
            let core = lock(&shared.core);
            for (i, rt) in core.slots.iter().enumerate() {
                let slot = SlotId(i as u32);
                let Some(h) = &rt.handle else { continue };
                if !matches!(core.sched.slot_state(slot), SlotState::Launching | SlotState::Up | SlotState::Stopping) {
                    continue;
                }
                let key = instance(&rt.class);
                let due = last.get(&key).is_none_or(|t| t.elapsed() >= rt.class.capabilities().probe_interval);
                if due {
                    work.entry(key).or_insert_with(|| (rt.class.clone(), Vec::new())).1.push((slot, h.clone()));
                }
            }
        }
        for (key, (class, items)) in work {
            last.insert(key, Instant::now());
            let max = class.capabilities().probe_batch_max.max(1);
            for chunk in items.chunks(max) {
                let handles: Vec<Handle> = chunk.iter().map(|(_, h)| h.clone()).collect();
                match class.probe(&handles).await {
                    Ok(lives) => shared.probed(chunk, lives),
                    Err(e) => warn!(class = %class.class(), "probing workers failed: {e}"),
                }
            }
        }
    }
}

impl Shared {
    pub(crate) fn probed(self: &Arc<Self>, items: &[(SlotId, Handle)], lives: Vec<Liveness>) {
        let mut closing = Vec::new();
        {
            let mut core = lock(&self.core);
            let now = Instant::now();
            for ((slot, handle), life) in items.iter().zip(lives) {
                let reason = match life {
                    Liveness::Exited { reason } => reason,
                    // A live connection is better evidence than a platform
                    // that lost track (eventual consistency, a class
                    // instance that did not start this agent): the
                    // heartbeat decides then.
                    Liveness::Unknown if core.slots[slot.0 as usize].conn.is_some() => continue,
                    Liveness::Unknown => "the platform no longer knows this worker".to_owned(),
                    Liveness::Starting => {
                        let rt = &core.slots[slot.0 as usize];
                        if rt.handle.as_ref() == Some(handle) && rt.class.capabilities().queues_launches {
                            core.sched.still_queued(*slot, now);
                        }
                        continue;
                    }
                    // Starting, running, or a state a newer class reports:
                    // nothing to do (the heartbeat still watches).
                    _ => continue,
                };
                let rt = &mut core.slots[slot.0 as usize];
                if rt.handle.as_ref() != Some(handle) {
                    continue;
                }
                match &rt.conn {
                    // The process reason is better than the connection's.
                    Some(conn) => closing.push((conn.clone(), reason)),
                    None => {
                        rt.launch = None;
                        self.note_crash(&core, *slot, &reason);
                        core.sched.lost(*slot, &reason, now);
                    }
                }
            }
            self.apply(&mut core);
        }
        for (conn, reason) in closing {
            self.on_closed(&conn, &reason);
        }
    }
}
