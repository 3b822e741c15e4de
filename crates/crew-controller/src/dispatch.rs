//! Carrying out what the scheduler decided: launches (grouped by class and
//! options), assignments, stops, deliveries; launch results and terminations.

use super::*;

/// Identity of a class *instance*: two recruits may use two instances of
/// the same class, and each knows only the agents it started, so handles
/// are grouped by instance, never by class name.
pub(crate) fn instance(class: &Arc<dyn Worker>) -> usize {
    Arc::as_ptr(class).cast::<()>() as usize
}

pub(crate) async fn terminate_all(handles: &[(Arc<dyn Worker>, Handle)]) {
    let mut by_class: HashMap<usize, (Arc<dyn Worker>, Vec<Handle>)> = HashMap::new();
    for (class, h) in handles {
        by_class.entry(instance(class)).or_insert_with(|| (class.clone(), Vec::new())).1.push(h.clone());
    }
    for (class, hs) in by_class.into_values() {
        if let Err(e) = class.terminate(&hs).await {
            warn!(class = %class.class(), "terminating workers failed: {e}");
        }
    }
}

pub(crate) async fn all_gone(handles: &[(Arc<dyn Worker>, Handle)]) -> bool {
    for (class, h) in handles {
        match class.probe(std::slice::from_ref(h)).await {
            Ok(l) if matches!(l.first(), Some(Liveness::Exited { .. } | Liveness::Unknown)) => {}
            _ => return false,
        }
    }
    true
}

impl Shared {
    /// Tells the observer when slot `slot`'s worker is lost while up (a
    /// crash, not a stop it was asked for); call before the scheduler
    /// hears of it.
    pub(crate) fn note_crash(&self, core: &Core, slot: SlotId, reason: &str) {
        if let Some(observer) = &self.config.observer {
            if core.sched.slot_state(slot) == SlotState::Up {
                let cfg = core.sched.slot_config(slot);
                observer.crashed(&cfg.name, &cfg.class, reason);
            }
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Carries out the scheduler's pending actions. Called with the lock
    /// held, after every event.
    pub(crate) fn apply(self: &Arc<Self>, core: &mut Core) {
        let mut actions = std::mem::take(&mut core.actions);
        core.sched.drain_actions_into(&mut actions);
        let now_ms = self.now_ms();
        let mut delivered = false;
        // Connections written to, flushed once at the end (one write
        // system call per worker per event, however many frames).
        let mut dirty: Vec<Arc<Conn>> = Vec::new();
        let mut queue = |conn: &Arc<Conn>, msg: &ControllerMsg| {
            if conn.queue(msg, now_ms) && !dirty.iter().any(|c| Arc::ptr_eq(c, conn)) {
                dirty.push(conn.clone());
            }
        };
        // Consecutive assignments to one slot, told to the observer at once.
        let mut assigned: Option<(SlotId, Vec<(JobId, u32)>)> = None;
        let tell = |core: &Core, assigned: &mut Option<(SlotId, Vec<(JobId, u32)>)>| {
            if let (Some(observer), Some((slot, jobs))) = (&self.config.observer, assigned.take()) {
                observer.assigned_many(&core.sched.slot_config(slot).name, &jobs);
            }
        };
        for action in actions.drain(..) {
            match (&action, &assigned) {
                (Action::Assign { slot, .. }, Some((to, _))) if to == slot => {}
                _ => tell(core, &mut assigned),
            }
            match action {
                Action::Assign { slot, job, attempt } => {
                    tracing::trace!(%job, attempt, slot = slot.0, "assign");
                    if self.config.observer.is_some() {
                        assigned.get_or_insert_with(|| (slot, Vec::new())).1.push((job, attempt));
                    }
                    let (Some(spec), Some(seed)) = (core.sched.job(job).cloned(), core.sched.job_seed(job)) else {
                        continue;
                    };
                    if let Some(conn) = &core.slots[slot.0 as usize].conn {
                        queue(conn, &ControllerMsg::Run(Box::new(RunJob { job, attempt, seed, spec })));
                    }
                }
                Action::Deliver(output) => {
                    if let Some(name) = &output.name {
                        if core.names.get(name) == Some(&output.id) {
                            core.names.remove(name);
                        }
                    }
                    core.outputs.push_back(*output);
                    delivered = true;
                }
                Action::Revoke { slot, job } => {
                    tracing::trace!(%job, slot = slot.0, "revoke");
                    if let Some(conn) = &core.slots[slot.0 as usize].conn {
                        queue(conn, &ControllerMsg::Revoke { job });
                    }
                }
                Action::Cancel { slot, job } => {
                    if let Some(conn) = &core.slots[slot.0 as usize].conn {
                        queue(conn, &ControllerMsg::Cancel { job });
                    }
                }
                Action::Launch(slots) => self.start_launches(core, slots),
                Action::Terminate { slot, reason } => self.terminate_slot(core, slot, &reason),
            }
        }
        tell(core, &mut assigned);
        for conn in dirty {
            conn.flush();
        }
        core.actions = actions;
        if delivered {
            self.outputs_ready.notify_waiters();
        }
    }

    pub(crate) fn start_launches(self: &Arc<Self>, core: &mut Core, slots: Vec<SlotId>) {
        if core.closing {
            return;
        }
        // One launch per class and option set, split by the class's batch
        // limit.
        let mut groups: Vec<LaunchGroup> = Vec::new();
        for slot in slots {
            let rt = &core.slots[slot.0 as usize];
            match groups.iter_mut().find(|(c, o, _)| Arc::ptr_eq(c, &rt.class) && *o == rt.options) {
                Some(g) => g.2.push(slot),
                None => groups.push((rt.class.clone(), rt.options.clone(), vec![slot])),
            }
        }
        for (class, options, slots) in groups {
            let max = class.capabilities().launch_batch_max.max(1);
            for chunk in slots.chunks(max) {
                let id = core.next_launch;
                core.next_launch += 1;
                let secret = Secret::random();
                let mut env = BTreeMap::new();
                // The pin is always set, empty for plaintext, so that one in
                // the controller's own environment never reaches an agent.
                let (connect, pin) = match (&self.loopback, class.capabilities().reaches_loopback) {
                    (Some(loopback), true) => (loopback.clone(), String::new()),
                    _ => (
                        self.advertise.clone(),
                        self.tls.as_ref().map(|t| t.fingerprint().to_owned()).unwrap_or_default(),
                    ),
                };
                if let (Some(resume), true) = (&self.config.resume, pin.is_empty()) {
                    env.insert(ENV_RESUME_FILE.to_owned(), resume.address_file.to_string_lossy().into_owned());
                }
                env.insert(ENV_CONNECT.to_owned(), connect);
                env.insert(ENV_TLS_SHA256.to_owned(), pin);
                env.insert(ENV_LAUNCH.to_owned(), id.to_string());
                env.insert(ENV_TOKEN.to_owned(), secret.expose().to_owned());
                let members = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, s)| LaunchMember::new(core.sched.slot_config(*s).name.clone(), i as u32))
                    .collect();
                let wall_time = core.sched.slot_config(chunk[0]).limits.wall_time;
                let spec =
                    LaunchSpec::new(self.config.agent.program.clone(), self.config.agent.portable_name(), members)
                        .with_args(self.config.agent.args.clone())
                        .with_env(env)
                        .with_options(options.clone())
                        .with_wall_time(wall_time);
                core.launches.insert(id, LaunchRt { secret, members: chunk.iter().map(|s| (*s, false)).collect() });
                for s in chunk {
                    core.slots[s.0 as usize].launch = Some(id);
                    core.slots[s.0 as usize].handle = None;
                }
                let shared = self.clone();
                let class = class.clone();
                let chunk = chunk.to_vec();
                tokio::spawn(async move {
                    let result = class.launch(&spec).await;
                    shared.launch_done(id, &chunk, result);
                });
            }
        }
        self.timer_wake.notify_one();
    }

    pub(crate) fn launch_done(
        self: &Arc<Self>,
        launch: u64,
        slots: &[SlotId],
        result: Result<Vec<Handle>, crew_core::worker::WorkerError>,
    ) {
        let mut guard = lock(&self.core);
        let core = &mut *guard;
        let now = Instant::now();
        match result {
            Ok(handles) => {
                let mut stale = Vec::new();
                for (slot, handle) in slots.iter().zip(handles) {
                    let rt = &mut core.slots[slot.0 as usize];
                    if rt.launch == Some(launch) && !core.closing {
                        rt.handle = Some(handle);
                    } else {
                        stale.push((rt.class.clone(), handle));
                    }
                }
                if !stale.is_empty() {
                    tokio::spawn(async move { terminate_all(&stale).await });
                }
            }
            Err(e) => {
                warn!(launch, "launch failed: {e}");
                let reason = e.to_string();
                for slot in slots {
                    if core.slots[slot.0 as usize].launch == Some(launch) {
                        core.slots[slot.0 as usize].launch = None;
                        core.sched.launch_failed(*slot, &reason, now);
                    }
                }
                core.launches.remove(&launch);
            }
        }
        self.apply(core);
    }

    pub(crate) fn terminate_slot(self: &Arc<Self>, core: &mut Core, slot: SlotId, reason: &str) {
        let now_ms = self.now_ms();
        let rt = &mut core.slots[slot.0 as usize];
        debug!(slot = %core.sched.slot_config(slot).name, reason, "stopping worker");
        if let Some(launch) = rt.launch.take() {
            if let Some(l) = core.launches.get_mut(&launch) {
                // This member may no longer connect.
                for m in &mut l.members {
                    if m.0 == slot {
                        m.1 = true;
                    }
                }
            }
        }
        let handle = rt.handle.clone();
        let class = rt.class.clone();
        let conn = rt.conn.clone();
        if let Some(conn) = &conn {
            conn.send(&ControllerMsg::Stop, now_ms);
        }
        if let Some(handle) = handle {
            let grace = if conn.is_some() { self.config.stop_grace } else { Duration::ZERO };
            tokio::spawn(async move {
                if let Some(conn) = conn {
                    let _ = tokio::time::timeout(grace, conn.closed.cancelled()).await;
                }
                if let Err(e) = class.terminate(&[handle]).await {
                    warn!("terminating a worker failed: {e}");
                }
            });
        }
    }
}
