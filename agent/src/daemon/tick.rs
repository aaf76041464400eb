//! The tick: close the interval (usage first, then energy, read back to back), attribute it,
//! record it (sealed and committed per the seal policy), rotate the node key when it is due,
//! then tell the shipper, the metrics and systemd. A stop is the last tick.

use std::collections::BTreeMap;
use std::time::Instant;

use wattd_collectors::cgroup::UsageSnapshot;

use super::{warn_due, Daemon, Flow, RENDER_EVERY};
use crate::attribution::host::HostBalance;
use crate::attribution::{apportion, RunUsage, Ties, Usage};
use crate::records;
use crate::sampler::{Interval, Stamp};
use crate::shipper::{signed_heartbeat, ShipState};

/// Spreads a run's reserved CPUs over packages in proportion to their size, exactly.
fn spread_reserved(reserved: Option<u64>, package_cpus: &BTreeMap<u32, u32>) -> BTreeMap<u32, u64> {
    let Some(total) = reserved else {
        return BTreeMap::new();
    };
    let weights: Vec<(u32, u64)> = package_cpus.iter().map(|(p, n)| (*p, *n as u64)).collect();
    let shares = apportion(total, &weights, Ties::SmallestKey);
    weights
        .iter()
        .zip(shares)
        .map(|((p, _), s)| (*p, s))
        .filter(|(_, s)| *s > 0)
        .collect()
}

/// The tracker's snapshot in attribution's terms, with the host bucket's CPU time paid from
/// `host`'s balance. The per-package usage maps are moved out rather than copied (nothing after
/// attribution reads them): no allocation per run per tick. Public for the whole-tick bench.
pub fn usage_from(
    snap: &mut UsageSnapshot,
    package_cpus: &BTreeMap<u32, u32>,
    host: &mut HostBalance,
) -> Usage {
    Usage {
        runs: snap
            .runs
            .iter_mut()
            .map(|r| RunUsage {
                run_id: r.run_id.clone(),
                cpu_us: std::mem::take(&mut r.usage_us_by_package),
                memory_bytes: r.memory_bytes,
                reserved_millicpus: spread_reserved(r.reserved_millicpus, package_cpus),
            })
            .collect(),
        // Busy time as attribution divides it: the runs' and the host's balanced share. An
        // interval whose busy time is unknown (/proc/stat unreadable) neither pays the host nor
        // moves its balance: attribution leaves the CPU meters undivided then, and a busy time
        // of 0 fed to the balance would be taken back from the host's next shares.
        busy_us: snap
            .packages
            .iter()
            .map(|(p, u)| {
                let host_us = if snap.busy_measured {
                    host.host_us(*p, u)
                } else {
                    0
                };
                (*p, u.runs_us.saturating_add(host_us))
            })
            .collect(),
        package_cpus: package_cpus.clone(),
        host_memory_bytes: None,
        gpus: BTreeMap::new(),
        cpu_busy_unknown: !snap.busy_measured,
    }
}

impl Daemon {
    /// A tick, or with `stop` the last one: everything pending is sealed and flushed.
    pub(super) async fn on_tick(&mut self, stop: bool) -> anyhow::Result<Flow> {
        // The GPUs' thread closes its interval meanwhile; it is awaited with a deadline.
        if let Some(g) = &mut self.gpus {
            g.request();
        }
        let tick_started = Instant::now();
        let now = Stamp::now();
        let (interval, snap) = self.close_interval(now, stop).await;
        self.record(&interval, &snap, now, stop)?;
        self.rotate_key_if_due(now)?;
        self.publish(&interval, &snap, now, tick_started, stop);
        if !stop {
            return Ok(Flow::Continue);
        }
        self.seal_at_stop(now)?;
        if !self.sealer.pending().is_empty() {
            // The spool could not take the last intervals (full). Stopping anyway loses their
            // energy to the agent-down gap the next start records: say so, and exit non-zero so
            // the supervisor and the operator see it.
            let pending = self.sealer.pending().intervals.len();
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
            anyhow::bail!(
                "stopping with {pending} interval(s) that the full spool could not take; their time will be recorded as an agent-down gap"
            );
        }
        tracing::info!(counters = ?self.tracker.counters(), "run tracker counters at stop");
        tracing::info!(
            index = interval.index,
            "stopping: last interval sealed and flushed"
        );
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        Ok(Flow::Stop)
    }

    /// Usage first, then energy, read back to back; attributed by the sampler.
    async fn close_interval(&mut self, now: Stamp, stop: bool) -> (Interval, UsageSnapshot) {
        let elapsed_us = self.sampler.elapsed_us(now);
        // Nothing readable on the tracker's inotify descriptor, as the reactor last saw it (it
        // wakes the loop for anything that comes; the loop clears it only just before reading
        // the queue empty): the tick skips its empty read. Asked with `try_io`, which neither
        // waits, nor spends the task's budget, nor clears the readiness (the closure does no
        // I/O). When readable, the tick reads, and the loop's wait then finds the readiness,
        // clears it and reads again (empty), as before. Never at the last tick: no wait follows
        // it to read what came since the reactor last looked.
        let unreadable = !stop
            && self
                .events
                .try_io(tokio::io::Interest::READABLE, |_| Ok(()))
                .is_err();
        if unreadable {
            self.tracker.skip_next_event_read();
        }
        let mut snap = self.tracker.tick(elapsed_us);
        for e in &snap.errors {
            tracing::debug!(run = ?e.run_id, error = %e.error, "usage read");
        }
        let gpu_interval = match &mut self.gpus {
            Some(g) => g.collect().await,
            None => crate::gpu::GpuInterval::default(),
        };
        // Without the host's busy time the runs would take the host's share of the CPU meters
        // too: those are left undivided (`cpu_busy_unknown`); the GPUs have their own usage.
        let mut u = usage_from(&mut snap, &self.package_cpus, &mut self.host);
        // The snapshot's runs include those that finished this tick, so their GPU samples of
        // this interval still find them. Built only when a GPU was observed: a host without
        // GPUs (or a tick whose NVML read failed) pays nothing per run for it.
        if !gpu_interval.observations.is_empty() {
            let runs = crate::attribution::gpu::RunCgroups::new(
                snap.runs.iter().map(|r| (&r.cgroup, &r.run_id)),
            );
            u.gpus = crate::gpu::usage(&gpu_interval.observations, &runs);
        }
        let unattributed: u64 = u
            .gpus
            .values()
            .map(|g| u64::from(g.unknown_cgroup_pids))
            .sum();
        if unattributed > 0 {
            self.metrics.add_gpu_unattributed_pids(unattributed);
            if warn_due(&mut self.unattributed_warned) {
                tracing::warn!(
                    pids = unattributed,
                    "GPU-using processes whose cgroup cannot be read (exited before it was seen, \
                     another PID namespace, or /proc hidden from wattd): their share goes to the \
                     host bucket; see wattd_gpu_unattributed_pids_total"
                );
            }
        }
        // The tick's end first, then the BMC's answers: one stamped before the end is in hand
        // (later ones wait in the meter for the next tick).
        let end = Stamp::now();
        if let Some(b) = &self.bmc {
            self.sampler.bmc_events(b.drain());
        }
        self.meters
            .read(self.sampler.elapsed_us(end), &mut self.readings);
        self.readings.extend(gpu_interval.readings);
        let interval = self.sampler.close(end, Some(u), self.readings.drain(..));
        if let Some(p) = self.sampler.last_platform() {
            self.metrics
                .set_platform(p, self.bmc.as_ref().map_or(0, |b| b.dropped()));
            if let Some(why) = &p.waiting {
                if warn_due(&mut self.platform_warned) {
                    tracing::warn!(reason = %why, "platform meter: no platform energy (a gap)");
                }
            }
        }
        (interval, snap)
    }

    /// Queues the interval's record (with the labels of runs not labelled yet) and the
    /// summaries of runs that finished, seals a batch when one is due, and commits.
    fn record(
        &mut self,
        interval: &Interval,
        snap: &UsageSnapshot,
        now: Stamp,
        stop: bool,
    ) -> anyhow::Result<()> {
        for r in snap.runs.iter().filter(|r| r.started) {
            self.started_unix
                .insert(r.run_id.to_string(), interval.start.unix_ns);
        }
        self.totals.add(interval.index, &interval.results);
        let mut record = records::interval(interval, &self.boot, false);
        // Labels reach the records once per run, in the interval where the run first has them
        // (its start, or the tick the control plane's run_started gave them to a run found by
        // its pattern first), and again in its summary.
        for r in snap.runs.iter().filter(|r| !r.labels.is_empty()) {
            // Checked before inserting: no String is made for a run already recorded.
            if !self.labelled.contains(&*r.run_id) && self.labelled.insert(r.run_id.to_string()) {
                record.run_labels.push(wattd_proto::v1::RunLabels {
                    run_id: r.run_id.to_string(),
                    labels: records::labels(&r.labels),
                });
            }
        }
        // A run's labels (its account) and its summary exist only in this process: a batch
        // that carries either is sealed at this tick, not left to a crash's loss window.
        let mut seal_now = !record.run_labels.is_empty();
        if self.sealer.push_or_coarsen(record, now.mono_ns) {
            self.coarsened_intervals += 1;
            tracing::warn!(
                index = interval.index,
                coarsened_intervals = self.coarsened_intervals,
                "spool full: interval merged into the pending one (coarser time, no energy lost)"
            );
        }
        for r in snap.runs.iter().filter(|r| r.finished) {
            seal_now = true;
            self.labelled.remove(&*r.run_id);
            let t = self.totals.finish(&r.run_id, interval.index);
            let started = self
                .started_unix
                .remove(&*r.run_id)
                .unwrap_or(interval.start.unix_ns);
            self.sealer.push_run_summary(
                records::run_summary(
                    &t,
                    started,
                    interval.end.unix_ns,
                    records::FinalUsageRecord {
                        how: r.final_usage,
                        reconciled_usage_us: r.reconciled_total_us,
                    },
                    &r.labels,
                ),
                now.mono_ns,
            );
        }
        // A batch per `[spool] seal_every_ms` of intervals (and everything pending at a stop):
        // what is not sealed yet is what a crash would lose to the next start's agent-down gap.
        let sealed = if stop || seal_now || self.sealer.seal_due(now.mono_ns) {
            self.sealer.seal(now.unix_ns)
        } else {
            Ok(None)
        };
        let merged = self.sealer.take_merged_at_refusal();
        if merged > 0 {
            self.coarsened_intervals += merged as u64;
            tracing::warn!(
                merged,
                coarsened_intervals = self.coarsened_intervals,
                "spool full: the pending intervals were merged into a coarser one (no energy lost)"
            );
        }
        match sealed {
            Ok(_) => {}
            Err(e) if e.is_fatal() => {
                return Err(anyhow::Error::new(e)
                    .context("sealing a batch (fatal: exiting so the supervisor restarts us)"))
            }
            Err(e) => tracing::warn!(error = %e, "sealing deferred; the interval stays pending"),
        }
        if let Err(e) = self.sealer.commit() {
            return Err(anyhow::Error::new(e).context(
                "fdatasync of the spool failed (fatal: the kernel may have dropped the pages)",
            ));
        }
        Ok(())
    }

    /// Rotates the node key once it is `[identity] rotate_after_s` old: announced in a batch
    /// signed by the old key, synced, then the new key signs; a crash at any step is finished
    /// or abandoned at the next start.
    fn rotate_key_if_due(&mut self, now: Stamp) -> anyhow::Result<()> {
        let rotate_after_ns = i64::try_from(self.cfg.identity_rotate_after_s)
            .unwrap_or(i64::MAX)
            .saturating_mul(1_000_000_000);
        if rotate_after_ns <= 0
            || now.unix_ns.saturating_sub(self.key_born_unix_ns) < rotate_after_ns
        {
            return Ok(());
        }
        match self.sealer.rotate_key(now.unix_ns) {
            Ok(seq) => {
                self.key_born_unix_ns = now.unix_ns;
                tracing::info!(
                    epoch = self.sealer.key().epoch(),
                    announced_seq = seq,
                    "node key rotated"
                );
            }
            Err(e) if e.is_fatal() => {
                return Err(anyhow::Error::new(e).context("rotating the node key (fatal)"));
            }
            Err(error) => {
                // Tried again in a minute, not every tick (each try makes a key).
                self.key_born_unix_ns = now
                    .unix_ns
                    .saturating_sub(rotate_after_ns)
                    .saturating_add(60_000_000_000);
                tracing::warn!(%error, "node key rotation deferred; tried again in a minute");
            }
        }
        Ok(())
    }

    /// Tells the shipper what is sealed (with a signed heartbeat).
    fn send_ship_state(&self, sealed_seq: u64, now: Stamp) {
        if let Some(s) = &self.shipping {
            s.state.send_replace(ShipState {
                sealed_seq,
                heartbeat: Some(signed_heartbeat(self.sealer.key(), sealed_seq, now.unix_ns)),
                signer: Some(self.sealer.shared_key()),
            });
        }
    }

    /// After the interval is recorded: the shipper's state, the metrics (rendered at most once
    /// a second) and systemd (READY after the first interval, then the watchdog's keep-alive when
    /// due, `watchdog.rs`).
    fn publish(
        &mut self,
        interval: &Interval,
        snap: &UsageSnapshot,
        now: Stamp,
        tick_started: Instant,
        stop: bool,
    ) {
        self.send_ship_state(self.sealer.spool().sealed_seq(), now);
        let metrics = &mut self.metrics;
        metrics.record_interval(interval);
        for r in snap.runs.iter().filter(|r| r.finished) {
            metrics.run_finished(&r.run_id, now.mono_ns);
        }
        metrics.expire(now.mono_ns);
        metrics.set_tracker(&snap.counters);
        let spool = self.sealer.spool();
        metrics.set_spool(spool.used_bytes(), spool.sealed_seq(), spool.acked_seq());
        metrics.set_coarsened(self.coarsened_intervals);
        metrics.set_shipper(&self.ship_stats);
        metrics.observe_tick(tick_started.elapsed());
        // Rendered here, so that a scrape costs the loop nothing, but at most once a second: at
        // 100 Hz, rendering and sealing every tick were together about half the tick's cost (the
        // daemon bench). A scrape sees the last render, at most a second (or an interval) old.
        // (Half an interval of slack: at 1 Hz a tick a little early still renders.)
        let render_after = RENDER_EVERY.saturating_sub(std::time::Duration::from_millis(
            self.cfg.reloadable.interval_ms / 2,
        ));
        if let Some(text) = &self.metrics_text {
            if stop
                || self
                    .last_render
                    .map_or(true, |t| tick_started.duration_since(t) >= render_after)
            {
                text.send_replace(std::sync::Arc::new(metrics.render()));
                self.last_render = Some(tick_started);
            }
        }
        if !self.ready {
            self.ready = true;
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
            tracing::info!(index = interval.index, "first interval closed; ready");
        } else {
            self.watchdog.tick_closed(tick_started);
        }
    }

    /// At a stop with intervals still pending (the spool was full): the stop may take the
    /// reserve's room beyond `max_bytes`, so the coarsened intervals are sealed now rather than
    /// lost with the process.
    fn seal_at_stop(&mut self, now: Stamp) -> anyhow::Result<()> {
        if self.sealer.pending().is_empty() {
            return Ok(());
        }
        self.sealer.spool_mut().allow_final_overrun();
        let pending = self.sealer.pending().intervals.len();
        // Commit whatever was appended, even if a later chunk did not fit.
        let sealed = self.sealer.seal(now.unix_ns);
        let committed = self.sealer.commit();
        if let Ok(seq) = &committed {
            self.send_ship_state(*seq, now);
        }
        match sealed.and(committed) {
            Ok(seq) => tracing::warn!(
                pending,
                sealed_seq = seq,
                "stopping with a full spool: the last (coarsened) intervals were sealed beyond spool.max_bytes, into the reserve's room"
            ),
            Err(e) if e.is_fatal() => {
                return Err(
                    anyhow::Error::new(e).context("sealing the last intervals at stop (fatal)")
                )
            }
            Err(error) => tracing::error!(
                %error,
                pending,
                left = self.sealer.pending().intervals.len(),
                "stopping: not every pending interval could be sealed"
            ),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use wattd_collectors::cgroup::{PackageUsage, TrackerCounters};

    use super::*;

    fn snapshot(busy_measured: bool, busy_signed_us: i128, runs_us: u64) -> UsageSnapshot {
        UsageSnapshot {
            interval_us: 1_000_000,
            runs: Vec::new(),
            packages: [(
                0,
                PackageUsage {
                    busy_signed_us,
                    runs_us,
                },
            )]
            .into_iter()
            .collect(),
            busy_measured,
            errors: Vec::new(),
            counters: TrackerCounters::default(),
            perf_disabled: None,
            perf_counters_disabled: None,
            cgroup_trace_disabled: None,
        }
    }

    #[test]
    fn an_interval_of_unknown_busy_time_leaves_the_host_balance_alone() {
        let cpus: BTreeMap<u32, u32> = [(0, 2)].into_iter().collect();
        let mut host = HostBalance::new(2);
        // /proc/stat unreadable: no busy time, the runs' 300 ms as read.
        let u = usage_from(&mut snapshot(false, 0, 300_000), &cpus, &mut host);
        assert!(u.cpu_busy_unknown);
        // Measured again: the host gets all of busy less runs, nothing taken back for the
        // interval nobody could divide.
        let u = usage_from(&mut snapshot(true, 500_000, 400_000), &cpus, &mut host);
        assert!(!u.cpu_busy_unknown);
        assert_eq!(u.busy_us.get(&0), Some(&500_000));
    }
}
