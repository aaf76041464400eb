//! The Prometheus text exposition of [`Metrics`]: one function per group of families, written
//! with the shared writer of `wattd_web::exposition` (exact decimal joules, the format's float
//! spellings, escaped label values and help), which the ledger's metrics use too. Seconds are
//! written as exact decimals here (`us_as_seconds`).

use wattd_web::exposition::{Float, Joules, Writer};

use super::*;

impl Metrics {
    /// The text exposition of every family.
    pub fn render(&self) -> String {
        let mut w = Writer::with_capacity(4096 + self.runs.len() * 160);
        self.render_runs(&mut w);
        self.render_energy(&mut w);
        self.render_spool(&mut w);
        self.render_ledger(&mut w);
        self.render_tracker(&mut w);
        w.finish()
    }

    /// The build, the endpoint and the per-run series.
    fn render_runs(&self, w: &mut Writer) {
        w.family(
            "wattd_build_info",
            "gauge",
            "The running wattd's version; always 1.",
        );
        w.sample(
            "wattd_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1u64,
        );

        w.family(
            "wattd_metrics_per_run_series",
            "gauge",
            "1 when the per-run series are served (the endpoint authenticates every request: \
             [metrics] web_config), 0 when only host-level series are.",
        );
        w.sample("wattd_metrics_per_run_series", &[], u64::from(self.per_run));
        if self.per_run {
            w.family(
                "wattd_run_energy_joules_total",
                "counter",
                "Energy attributed to a workflow run (active + idle share), by domain, since its \
                 series appeared. Series of finished runs are dropped after \
                 metrics.finished_run_ttl_s.",
            );
            for (id, e) in &self.runs {
                for (domain, uj) in &e.energy_uj {
                    w.sample(
                        "wattd_run_energy_joules_total",
                        &[("run_id", id), ("domain", domain.as_str())],
                        Joules(*uj),
                    );
                }
            }
        }
        if let Some(stats) = &self.endpoint {
            w.family(
                "wattd_metrics_requests_refused_total",
                "counter",
                "Requests to this endpoint refused, by reason: busy (every connection slot \
                 taken), tls_failed (handshake failed: no or an unverified client certificate), \
                 unauthenticated (no or wrong basic-auth credentials), throttled (too many \
                 unverified credentials tried).",
            );
            for (reason, n) in stats.by_reason() {
                w.sample(
                    "wattd_metrics_requests_refused_total",
                    &[("reason", reason)],
                    n,
                );
            }
        }
        if self.per_run {
            w.family(
                "wattd_metrics_runs_exported",
                "gauge",
                "Runs with series in wattd_run_energy_joules_total.",
            );
            w.sample("wattd_metrics_runs_exported", &[], self.runs.len() as u64);
        }
        w.family(
            "wattd_metrics_runs_dropped_total",
            "counter",
            "Runs whose series were refused or dropped early because the per-run series cap was \
             reached.",
        );
        w.sample("wattd_metrics_runs_dropped_total", &[], self.runs_dropped);
    }

    /// Energy, power and the intervals' gaps, the GPUs and the platform meter.
    fn render_energy(&self, w: &mut Writer) {
        w.family(
            "wattd_host_energy_joules_total",
            "counter",
            "Energy not billed to any run: the host bucket's active and idle shares, and energy \
             left unattributed (quarantined, no usage data, no CPU in package).",
        );
        for ((domain, source, part), uj) in &self.host_uj {
            w.sample(
                "wattd_host_energy_joules_total",
                &[
                    ("domain", domain.as_str()),
                    ("source", source.as_str()),
                    ("part", part),
                ],
                Joules(*uj),
            );
        }

        w.family(
            "wattd_measured_energy_joules_total",
            "counter",
            "Energy measured (or estimated, quality=\"estimated\") by each billed meter; gaps \
             excluded.",
        );
        for ((domain, package, source, quality), uj) in &self.measured_uj {
            let package = package_label(*package);
            w.sample(
                "wattd_measured_energy_joules_total",
                &[
                    ("domain", domain.as_str()),
                    ("package", &package),
                    ("source", source.as_str()),
                    ("quality", quality),
                ],
                Joules(*uj),
            );
        }

        w.family(
            "wattd_power_watts",
            "gauge",
            "Average power of each billed meter over the last interval; absent when that interval \
             was a gap or quarantined.",
        );
        for ((domain, package), watts) in &self.power_w {
            let package = package_label(*package);
            w.sample(
                "wattd_power_watts",
                &[("domain", domain.as_str()), ("package", &package)],
                Float(*watts),
            );
        }

        histogram(
            w,
            "wattd_tick_duration_seconds",
            "Time to close one interval: usage, meters, attribution, seal and fdatasync.",
            &self.tick,
        );
        w.family(
            "wattd_intervals_total",
            "counter",
            "Intervals closed and attributed.",
        );
        w.sample("wattd_intervals_total", &[], self.intervals);
        w.family(
            "wattd_measured_seconds_total",
            "counter",
            "Time the closed intervals cover: an energy counter's increase over this one's is \
             the average power between two scrapes, whenever the text was rendered.",
        );
        w.sample(
            "wattd_measured_seconds_total",
            &[],
            us_as_seconds(self.measured_us),
        );
        w.family(
            "wattd_gaps_total",
            "counter",
            "Gap records: spans of unknown energy, by cause.",
        );
        for c in CAUSES {
            w.sample(
                "wattd_gaps_total",
                &[("cause", cause_name(c))],
                self.gaps[cause_index(c)],
            );
        }
        w.family(
            "wattd_quarantined_total",
            "counter",
            "Meter readings quarantined: a delta above the domain's physical ceiling.",
        );
        w.sample("wattd_quarantined_total", &[], self.quarantined);
        w.family(
            "wattd_gpu_unmeasured_devices",
            "gauge",
            "NVIDIA GPUs on the PCI bus, bound to the nvidia driver, that wattd cannot measure \
             (device access, NVML permission, library): their energy is not billed. \
             `wattd probe` says why.",
        );
        w.sample("wattd_gpu_unmeasured_devices", &[], self.gpu_unmeasured);
        w.family(
            "wattd_gpu_unattributed_pids_total",
            "counter",
            "GPU-using processes whose cgroup could not be read (/proc hidden or gone), so \
             their share of the GPU went to the host bucket; counted once per interval and GPU.",
        );
        w.sample(
            "wattd_gpu_unattributed_pids_total",
            &[],
            self.gpu_unattributed_pids,
        );
        if let Some(p) = &self.platform {
            p.render(w);
        }
    }

    /// The spool's size and what is not yet acknowledged.
    fn render_spool(&self, w: &mut Writer) {
        w.family(
            "wattd_spool_bytes",
            "gauge",
            "Bytes of all spool segments on disk.",
        );
        w.sample("wattd_spool_bytes", &[], self.spool_bytes);
        w.family(
            "wattd_spool_unacked_batches",
            "gauge",
            "Batches sealed in the spool and not yet acknowledged by the ledger.",
        );
        w.sample("wattd_spool_unacked_batches", &[], self.spool_unacked);
        w.family(
            "wattd_spool_oldest_unacked_age_seconds",
            "gauge",
            "How long the oldest batch not yet acknowledged by the ledger has been sealed (to \
             the second; 0 when all are acknowledged). Growing: delivery is stalled.",
        );
        w.sample(
            "wattd_spool_oldest_unacked_age_seconds",
            &[],
            self.delivery
                .oldest_unacked_age(std::time::Instant::now())
                .as_secs(),
        );
        w.family(
            "wattd_spool_coarsened_intervals_total",
            "counter",
            "Intervals merged into a coarser pending one because the spool was full (no energy \
             lost).",
        );
        w.sample("wattd_spool_coarsened_intervals_total", &[], self.coarsened);
    }

    /// The ledger session: connection, acknowledgements, losses and errors.
    fn render_ledger(&self, w: &mut Writer) {
        let l = &self.ledger;
        for (name, help, value) in [
            ("wattd_ledger_configured", "1 when a [ledger] is configured and the shipper runs.", u64::from(l.configured)),
            ("wattd_ledger_connected", "1 while a stream to the ledger is open.", u64::from(l.connected)),
            ("wattd_ledger_acked_seq", "Highest batch seq the ledger acknowledged as durably stored.", l.acked_seq),
            ("wattd_ledger_missing_from_seq", "First seq the ledger last reported missing (a hole it holds batches above); 0 if none.", l.missing_from),
        ] {
            w.family(name, "gauge", help);
            w.sample(name, &[], value);
        }
        for (name, help, value) in [
            (
                "wattd_ledger_sessions_total",
                "Streams started (connect attempts included).",
                l.sessions,
            ),
            (
                "wattd_ledger_batches_sent_total",
                "Batches sent on a stream (re-sends after a reconnect included).",
                l.batches_sent,
            ),
            (
                "wattd_ledger_heartbeats_sent_total",
                "Signed heartbeats sent.",
                l.heartbeats_sent,
            ),
            (
                "wattd_ledger_acks_total",
                "Acknowledgements received.",
                l.acks,
            ),
            (
                "wattd_ledger_rewinds_total",
                "Sessions that opened with the ledger acknowledging less than before (restored \
                 from a backup): batches re-sent from the spool.",
                l.rewinds,
            ),
            (
                "wattd_ledger_rewind_unheld_batches_total",
                "Batches a restored ledger lacked that the spool no longer held (could not be \
                 re-sent; see spool.retain_acked_s).",
                l.rewind_unheld,
            ),
            (
                "wattd_ledger_bad_acks_total",
                "Acknowledgements refused: beyond the seq this node has sealed.",
                l.bad_acks,
            ),
        ] {
            w.family(name, "counter", help);
            w.sample(name, &[], value);
        }
        for (name, help, pick) in [
            (
                "wattd_ledger_loss_statements_total",
                "Signed loss statements sent to the ledger (sent again when it did not take \
                 them), by reason: damaged (sealed records damaged in the spool), not_retained \
                 (a restored ledger asked for batches the spool no longer holds).",
                0usize,
            ),
            (
                "wattd_ledger_lost_batches_total",
                "Distinct batches declared lost to the ledger, by reason (their energy is known \
                 from the running totals of the batches around them).",
                1usize,
            ),
        ] {
            w.family(name, "counter", help);
            for (i, reason) in ["damaged", "not_retained"].into_iter().enumerate() {
                let v = if pick == 0 {
                    l.losses[i].0
                } else {
                    l.losses[i].1
                };
                w.sample(name, &[("reason", reason)], v);
            }
        }
        w.family(
            "wattd_ledger_session_errors_total",
            "counter",
            "Streams that ended, by reason (connect, tls_files, endpoint, ack_timeout, closed, \
             spool_read, status_<grpc code>).",
        );
        for (reason, n) in &l.session_errors {
            w.sample(
                "wattd_ledger_session_errors_total",
                &[("reason", reason)],
                *n,
            );
        }
    }

    /// The run tracker's counters.
    fn render_tracker(&self, w: &mut Writer) {
        // Destructured field by field so that a counter added to the tracker fails to compile
        // here until it is exported too.
        let TrackerCounters {
            runs_tracked,
            kept_fds,
            fd_budget,
            fd_fallback_runs,
            perf_fallback_runs,
            perf_uncounted_runs,
            hostile_names_skipped,
            host_clamps,
            vanished_at_discovery,
            vanished_before_final_read,
            read_errors,
            watch_fallbacks,
            inotify_overflows,
            rescans,
            usage_went_backwards,
            final_read,
            final_perf_counted,
            final_traced,
            final_reconciled,
            final_reconciled_shared,
            final_lost,
            ghost_runs,
            reconciled_us,
            reconcile_points,
            reconcile_parent_busy,
            run_id_reused,
            children_listed_early,
            reconcile_clamped_us,
            reconcile_retries,
            traced_cgroups,
            untraced_cgroups,
            trace_missed,
            trace_mismatches,
            trace_swept,
            unclaimed_us,
        } = self.tracker;
        w.family(
            "wattd_tracker_final_usage_total",
            "counter",
            "Finished runs by how their last usage was obtained: read from their own cpu.stat, \
             counted from their creation by the cgroup trace (eBPF), \
             counted by their perf task-clock counters after the cgroup was removed, \
             reconciled through the parent (alone or shared with others that went away in the \
             same stretch), or lost (the tail since the last read is the host's).",
        );
        for (how, v) in [
            ("read", final_read),
            ("traced", final_traced),
            ("perf_counted", final_perf_counted),
            ("reconciled", final_reconciled),
            ("reconciled_shared", final_reconciled_shared),
            ("lost", final_lost),
        ] {
            w.sample("wattd_tracker_final_usage_total", &[("how", how)], v);
        }
        for (name, kind, help, v) in [
            (
                "wattd_runs_tracked",
                "gauge",
                "Runs the tracker follows.",
                runs_tracked,
            ),
            (
                "wattd_tracker_kept_fds",
                "gauge",
                "File descriptors the tracker keeps open for runs.",
                kept_fds,
            ),
            (
                "wattd_tracker_fd_budget",
                "gauge",
                "File descriptors the tracker may keep open for runs.",
                fd_budget,
            ),
            (
                "wattd_tracker_fd_fallback_runs_total",
                "counter",
                "Runs read open-read-close because the descriptor budget was full.",
                fd_fallback_runs,
            ),
            (
                "wattd_tracker_perf_fallback_runs_total",
                "counter",
                "Runs split over packages by /proc/stat share because perf counters were \
                 unavailable.",
                perf_fallback_runs,
            ),
            (
                "wattd_tracker_perf_uncounted_runs_total",
                "counter",
                "Runs without perf task-clock counters (disabled, not permitted, descriptor \
                 budget full, runs.perf_counters_max reached): the tail of one removed before \
                 its final read comes from the cgroup trace or its parent.",
                perf_uncounted_runs,
            ),
            (
                "wattd_tracker_traced_cgroups_total",
                "counter",
                "Cgroups made under a run parent and counted from their creation by the cgroup \
                 trace (eBPF).",
                traced_cgroups,
            ),
            (
                "wattd_tracker_untraced_cgroups_total",
                "counter",
                "Cgroups made under a run parent the cgroup trace could not count (its maps \
                 full, a name over 126 bytes): billed from the parent's residual instead.",
                untraced_cgroups,
            ),
            (
                "wattd_tracker_trace_missed_total",
                "counter",
                "Slices of CPU time the cgroup trace did not count (the kernel skipped its \
                 program, already running on that CPU).",
                trace_missed,
            ),
            (
                "wattd_tracker_trace_swept_total",
                "counter",
                "Cgroup trace entries dropped by a sweep: of cgroups gone whose removal no event \
                 or reconcile point reported (an inotify overflow).",
                trace_swept,
            ),
            (
                "wattd_tracker_trace_mismatches_total",
                "counter",
                "Runs read after they emptied whose final cpu.stat differed from the cgroup \
                 trace's count (0 unless the trace is wrong on this kernel).",
                trace_mismatches,
            ),
            (
                "wattd_tracker_hostile_names_skipped_total",
                "counter",
                "Cgroup names shaped like a run but with a refused run id.",
                hostile_names_skipped,
            ),
            (
                "wattd_tracker_host_clamps_total",
                "counter",
                "Package intervals where runs' usage exceeded measured busy time.",
                host_clamps,
            ),
            (
                "wattd_tracker_vanished_at_discovery_total",
                "counter",
                "Cgroups that vanished between being listed and opened.",
                vanished_at_discovery,
            ),
            (
                "wattd_tracker_vanished_before_final_read_total",
                "counter",
                "Runs whose cgroup went away before a final read (usage may be missing).",
                vanished_before_final_read,
            ),
            (
                "wattd_tracker_read_errors_total",
                "counter",
                "Failed reads of run cgroup files.",
                read_errors,
            ),
            (
                "wattd_tracker_watch_fallbacks_total",
                "counter",
                "Runs without a cgroup.events watch (inotify limit): measured at ticks only.",
                watch_fallbacks,
            ),
            (
                "wattd_tracker_inotify_overflows_total",
                "counter",
                "inotify queue overflows (each forces a rescan).",
                inotify_overflows,
            ),
            (
                "wattd_tracker_rescans_total",
                "counter",
                "Full rescans of the cgroup tree.",
                rescans,
            ),
            (
                "wattd_tracker_usage_went_backwards_total",
                "counter",
                "Times a run's usage_usec decreased (cgroup recreated under the same name).",
                usage_went_backwards,
            ),
            (
                "wattd_tracker_ghost_runs_total",
                "counter",
                "Runs created and removed before they could be opened, billed from their parent.",
                ghost_runs,
            ),
            (
                "wattd_tracker_reconcile_points_total",
                "counter",
                "Reconcile points: a parent's cpu.stat read against its children's.",
                reconcile_points,
            ),
            (
                "wattd_tracker_reconcile_parent_busy_total",
                "counter",
                "Reconcile points where the parent held processes of its own, so removed \
                 children's tails were recorded as lost.",
                reconcile_parent_busy,
            ),
            (
                "wattd_tracker_run_id_reused_total",
                "counter",
                "Cgroups that appeared under a finished run's name (not billed as that run again).",
                run_id_reused,
            ),
            (
                "wattd_tracker_children_listed_early_total",
                "counter",
                "Children of a reconciled parent found by listing it before their creation event \
                 was read (a lagging event queue).",
                children_listed_early,
            ),
            (
                "wattd_tracker_reconcile_retries_total",
                "counter",
                "Reconcile points read again because the parent moved too much between its two \
                 reads (the agent was preempted mid-point).",
                reconcile_retries,
            ),
        ] {
            w.family(name, kind, help);
            w.sample(name, &[], v);
        }
        // CPU time in seconds (exact: microseconds as a decimal), as Prometheus names units.
        for (name, help, us) in [
            (
                "wattd_tracker_reconciled_cpu_seconds_total",
                "CPU time of removed run cgroups recovered from their parents' cpu.stat.",
                reconciled_us,
            ),
            (
                "wattd_tracker_reconcile_clamped_cpu_seconds_total",
                "CPU time of a parent's residual beyond what the machine could have run (not 0: \
                 the parent's and children's counters disagreed; the excess is the host's).",
                reconcile_clamped_us,
            ),
        ] {
            w.family(name, "counter", help);
            w.sample(name, &[], us_as_seconds(us));
        }
        let name = "wattd_tracker_unclaimed_cpu_seconds";
        w.family(
            name,
            "gauge",
            "CPU time held in run parents' positive balances: parent growth no child read \
             accounts for (children gone unread, tails held back at wide or incomplete points, \
             slices the cgroup trace missed, processes of the parent's own); paid to that \
             family's next claimant, else the host's (near 0: timing noise; growing: runs billed \
             short).",
        );
        w.sample(name, &[], us_as_seconds(unclaimed_us));
    }
}

impl PlatformStats {
    fn render(&self, w: &mut Writer) {
        w.family(
            "wattd_bmc_readings_total",
            "counter",
            "Readings of the node's wall power or energy from the BMC (Redfish).",
        );
        w.sample("wattd_bmc_readings_total", &[], self.readings);
        w.family(
            "wattd_bmc_failures_total",
            "counter",
            "BMC polls that failed (unreachable, timed out, refused, garbage): see the log.",
        );
        w.sample("wattd_bmc_failures_total", &[], self.failures);
        w.family(
            "wattd_bmc_dropped_total",
            "counter",
            "BMC answers dropped because the measuring loop did not take them in time.",
        );
        w.sample("wattd_bmc_dropped_total", &[], self.dropped);
        w.family(
            "wattd_bmc_readings_refused_total",
            "counter",
            "BMC readings the platform meter could not use: out of order, over its pending bound, \
             or older than any interval whose components are known (after a component's gap).",
        );
        w.sample("wattd_bmc_readings_refused_total", &[], self.refused);
        w.family(
            "wattd_platform_lost_spans_total",
            "counter",
            "Spans whose platform energy is unknown (recorded as gaps): the BMC silent past \
             max_gap_ms, its counter reset or jumped, or a component meter's gap.",
        );
        w.sample("wattd_platform_lost_spans_total", &[], self.lost);
        w.family(
            "wattd_platform_carry_joules",
            "gauge",
            "Platform energy carried to later ticks: negative while the wall reads below the \
             components (a late or low BMC, a coarse counter between steps), positive while a \
             lump above max_watts per tick is paid out. Carried, never clamped.",
        );
        w.sample(
            "wattd_platform_carry_joules",
            &[],
            Float(self.carry_uj as f64 / 1e6),
        );
        w.family(
            "wattd_platform_measuring",
            "gauge",
            "1 while the platform meter has a baseline reading from the BMC, 0 while its energy \
             is a gap.",
        );
        w.sample("wattd_platform_measuring", &[], u8::from(self.baseline));
        if let Some(mw) = self.wall_power_mw {
            w.family(
                "wattd_wall_power_watts",
                "gauge",
                "The node's power as its BMC last stated it.",
            );
            w.sample("wattd_wall_power_watts", &[], Float(mw as f64 / 1e3));
        }
    }
}

/// A histogram family: cumulative buckets, `+Inf`, sum and count.
fn histogram(w: &mut Writer, name: &str, help: &str, h: &Histogram) {
    w.family(name, "histogram", help);
    let bucket = format!("{name}_bucket");
    let mut cumulative = 0u64;
    for (bound, n) in h.bounds.iter().zip(&h.counts) {
        cumulative += n;
        let le = Float(*bound).to_string();
        w.sample(&bucket, &[("le", &le)], cumulative);
    }
    w.sample(&bucket, &[("le", "+Inf")], h.count);
    w.sample(&format!("{name}_sum"), &[], Float(h.sum));
    w.sample(&format!("{name}_count"), &[], h.count);
}
