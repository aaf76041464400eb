//! The cgroup trace (eBPF on `cgroup_mkdir` and `sched_stat_runtime`) on the running kernel, with
//! real cgroups and real processes: what it counts is the kernel's own `usage_usec`, from the
//! cgroup's creation, and it is still there after the cgroup is removed.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use wattd_collectors::cgroup::trace::{CgroupTrace, Traced};
use wattd_testkit::cgroups::{require_cgroups, usage_usec_of, TestCgroups};

/// The trace, or `None` after a loud SKIPPED line (a failure under the strict switch).
fn trace(test: &str) -> Option<(CgroupTrace, TestCgroups)> {
    let mount = require_cgroups(test)?;
    match CgroupTrace::load() {
        Ok(t) => Some((t, TestCgroups::new(&mount, "trace").unwrap())),
        Err(e) => {
            wattd_testkit::need::skip(test, format!("eBPF with BTF and CAP_BPF ({e})"));
            None
        }
    }
}

/// A shell loop of `loops` turns.
fn burner(loops: u32) -> String {
    format!("i=0; while [ $i -lt {loops} ]; do i=$((i+1)); done")
}

/// Runs the shell script `script(i)` in `run-<i>` for each of `n` runs at once, waits for them
/// all and for their last slices, and gives each run's name, its `usage_usec` and the trace's
/// count.
fn run_all(
    trace: &CgroupTrace,
    cg: &mut TestCgroups,
    n: u32,
    script: impl Fn(u32) -> String,
) -> Vec<(String, u64, Traced)> {
    let parent = ino(&cg.path(""));
    trace.watch_parent(parent).unwrap();
    for i in 0..n {
        cg.spawn_joining(&format!("run-{i}"), &script(i)).unwrap();
    }
    cg.wait_all();
    std::thread::sleep(Duration::from_millis(200));
    (0..n)
        .map(|i| {
            let name = format!("run-{i}");
            let kernel = usage_usec_of(&cg.path(&name)).unwrap();
            let id = trace
                .id_of(parent, name.as_bytes())
                .unwrap()
                .expect("traced");
            let traced = trace.usage(id).unwrap().expect("an entry");
            (name, kernel, traced)
        })
        .collect()
}

fn ino(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).unwrap().ino()
}

#[test]
fn a_traced_cgroup_counts_its_usage_usec_exactly_and_keeps_it_after_removal() {
    let Some((trace, mut cg)) = trace("a_traced_cgroup_counts_its_usage_usec_exactly") else {
        return;
    };
    let parent = ino(&cg.path(""));
    trace.watch_parent(parent).unwrap();
    let before = trace.stats().unwrap();
    let names = ["run-a", "run-b", "run-c"];
    for (i, n) in names.iter().enumerate() {
        cg.spawn_joining(n, &burner(20_000 * (i as u32 + 1)))
            .unwrap();
    }
    cg.wait_all();
    // The exiting tasks' last slices are charged after they are reaped.
    std::thread::sleep(Duration::from_millis(100));
    for n in names {
        let dir = cg.path(n);
        let id = trace
            .id_of(parent, n.as_bytes())
            .unwrap()
            .expect("traced by name");
        assert_eq!(id, ino(&dir), "{n}: the cgroup id is the directory's inode");
        let kernel = usage_usec_of(&dir).unwrap();
        let traced = trace.usage(id).unwrap().expect("an entry");
        assert!(kernel > 0, "{n}: the burner ran");
        assert_eq!(traced.usage_us(), Some(kernel), "{n}: {traced:?}");
        std::fs::remove_dir(&dir).unwrap();
        // Gone from the hierarchy, not from the trace.
        assert_eq!(trace.id_of(parent, n.as_bytes()).unwrap(), Some(id));
        assert_eq!(trace.usage(id).unwrap(), Some(traced));
        trace.forget(id, parent, n.as_bytes()).unwrap();
        assert_eq!(trace.usage(id).unwrap(), None);
        assert_eq!(trace.id_of(parent, n.as_bytes()).unwrap(), None);
    }
    let after = trace.stats().unwrap();
    assert_eq!(after.traced - before.traced, 3);
    assert_eq!(after.failed, before.failed);
}

#[test]
fn only_children_of_watched_parents_are_traced_and_a_parent_of_cgroups_is_marked() {
    let Some((trace, cg)) = trace("only_children_of_watched_parents_are_traced") else {
        return;
    };
    let parent = ino(&cg.path(""));
    cg.create("unwatched").unwrap();
    assert_eq!(trace.id_of(parent, b"unwatched").unwrap(), None);
    trace.watch_parent(parent).unwrap();
    cg.create("run-nested").unwrap();
    let id = trace.id_of(parent, b"run-nested").unwrap().expect("traced");
    assert_eq!(
        trace.usage(id).unwrap().map(|t| t.has_children),
        Some(false)
    );
    // A cgroup under a traced one: the traced one's entry no longer holds all its time.
    cg.create("run-nested/inner").unwrap();
    let t = trace.usage(id).unwrap().expect("an entry");
    assert!(t.has_children);
    assert_eq!(t.usage_us(), None);
    assert_eq!(
        trace.id_of(id, b"inner").unwrap(),
        None,
        "not a watched parent"
    );
    trace.unwatch_parent(parent).unwrap();
    cg.create("after-unwatch").unwrap();
    assert_eq!(trace.id_of(parent, b"after-unwatch").unwrap(), None);
    trace.forget(id, parent, b"run-nested").unwrap();
}

#[test]
fn a_name_too_long_for_the_key_is_not_traced_by_name() {
    let Some((trace, cg)) = trace("a_name_too_long_for_the_key_is_not_traced_by_name") else {
        return;
    };
    let parent = ino(&cg.path(""));
    trace.watch_parent(parent).unwrap();
    let long = "r".repeat(200);
    let before = trace.stats().unwrap();
    cg.create(&long).unwrap();
    assert_eq!(trace.id_of(parent, long.as_bytes()).unwrap(), None);
    // Its prefixes are other names, and name nothing either.
    for cut in [126, 127, 128] {
        assert_eq!(trace.id_of(parent, &long.as_bytes()[..cut]).unwrap(), None);
    }
    assert_eq!(trace.stats().unwrap().failed, before.failed + 1);
    // The longest name kept.
    let longest = "r".repeat(wattd_collectors::cgroup::trace::NAME_MAX);
    cg.create(&longest).unwrap();
    assert!(trace.id_of(parent, longest.as_bytes()).unwrap().is_some());
}

#[test]
fn many_runs_at_once_on_a_crowded_host_are_counted_never_over_nearly_all_exactly() {
    let Some((trace, mut cg)) = trace("many_runs_at_once_on_a_crowded_host") else {
        return;
    };
    let n = 300;
    let (mut off, mut short) = (Vec::new(), 0);
    for (name, kernel, traced) in run_all(&trace, &mut cg, n, |i| burner(3_000 + 37 * i)) {
        let Some(us) = traced.usage_us() else {
            off.push(format!("{name}: kernel {kernel} us, traced {traced:?}"));
            continue;
        };
        // Now and then one run in some hundreds short by a slice the trace did not see (seen:
        // 10 us of a 9 ms run, one in 300).
        match crate::traced_as_kernel(&name, us, kernel) {
            Ok(was_short) => short += u32::from(was_short),
            Err(e) => off.push(e),
        }
    }
    assert!(
        off.is_empty() && short * 100 <= n,
        "{} of {n} off, {short} short:\n{}",
        off.len(),
        off.join("\n")
    );
}

/// Runs that sleep and wake (a shell that runs `sleep` between bursts: forks, exits, wakeups
/// across CPUs), 300 at once on two CPUs. On the kernel this was measured on, now and then one
/// such run comes out short of `usage_usec`, never over it: in about one test in forty (6 of
/// 236 on 2026-12-06), one run of the 300, by 35 to 584 us at once (a run polled every few
/// milliseconds showed its whole shortfall appear between two polls, not a drift), 3.5% of that
/// run at worst; no program run was skipped, no read faulted, and runs that fork and exit
/// without sleeping (`/bin/true`, a subshell: 24 tests) showed none. The kernel charges slices
/// the program never sees (see ARCHITECTURE.md, the cgroup trace). Asserted: never over, nine in ten exact, at most one run
/// more than 1% or more than 1 ms short, their sum within 0.1% of the kernel's, no program run
/// missed.
#[test]
fn sleeping_runs_are_counted_never_above_the_kernel_and_nearly_all_exactly() {
    let Some((trace, mut cg)) = trace("sleeping_runs_are_counted_never_above_the_kernel") else {
        return;
    };
    let n = 300;
    let (mut exact, mut off) = (0, Vec::new());
    let (mut kernel_all, mut traced_all) = (0u64, 0u64);
    let mut far_off = 0;
    let sleeper = |i: u32| {
        format!(
            "i=0; while [ $i -lt {} ]; do i=$((i+1)); if [ $((i % 500)) = 0 ]; then sleep 0.01; fi; done",
            2_000 + 13 * i
        )
    };
    for (name, kernel, traced) in run_all(&trace, &mut cg, n, sleeper) {
        let traced = traced.usage_us().unwrap();
        assert!(
            traced <= kernel,
            "{name}: traced {traced} us over the kernel's {kernel}"
        );
        kernel_all += kernel;
        traced_all += traced;
        if traced * 100 < kernel * 99 || kernel - traced > 1_000 {
            far_off += 1;
        }
        if traced == kernel {
            exact += 1;
        } else {
            off.push(format!("{name}: {traced} of {kernel} us"));
        }
    }
    eprintln!("{exact} of {n} exact; off: {off:?}; all: {traced_all} of {kernel_all} us");
    assert!(exact * 10 >= n * 9, "{exact} of {n} exact: {off:?}");
    assert!(
        far_off <= 1,
        "{far_off} runs short by over 1% or 1 ms: {off:?}"
    );
    assert!(
        traced_all * 1000 >= kernel_all * 999,
        "all runs: traced {traced_all} us of {kernel_all}: {off:?}"
    );
    assert_eq!(trace.stats().unwrap().missed, 0);
}

/// A cgroup made again under a name the trace still holds (the tracker not done with the first)
/// is not traced: the name keeps meaning the first, whose count stays its own.
#[test]
fn a_name_made_again_while_held_keeps_meaning_the_first_cgroup() {
    let Some((trace, mut cg)) = trace("a_name_made_again_while_held_keeps_meaning_the_first")
    else {
        return;
    };
    let parent = ino(&cg.path(""));
    trace.watch_parent(parent).unwrap();
    cg.spawn_joining("run-x", &burner(20_000)).unwrap();
    cg.wait_all();
    std::thread::sleep(Duration::from_millis(50));
    let first = ino(&cg.path("run-x"));
    let first_us = usage_usec_of(&cg.path("run-x")).unwrap();
    std::fs::remove_dir(cg.path("run-x")).unwrap();
    let before = trace.stats().unwrap();
    cg.spawn_joining("run-x", &burner(40_000)).unwrap();
    cg.wait_all();
    let second = ino(&cg.path("run-x"));
    assert_ne!(first, second);
    assert_eq!(trace.id_of(parent, b"run-x").unwrap(), Some(first));
    assert_eq!(
        trace.usage(second).unwrap(),
        None,
        "the second is not traced"
    );
    assert_eq!(trace.stats().unwrap().failed, before.failed + 1);
    let t = trace.usage(first).unwrap().expect("the first's count");
    assert_eq!(t.usage_us(), Some(first_us));
    // Once the first is forgotten, the name is free for the next one.
    trace.forget(first, parent, b"run-x").unwrap();
    std::fs::remove_dir(cg.path("run-x")).unwrap();
    cg.create("run-x").unwrap();
    assert_eq!(
        trace.id_of(parent, b"run-x").unwrap(),
        Some(ino(&cg.path("run-x")))
    );
}

/// A straight-line program of `n` instructions: long enough that its verification takes a
/// while, so a signal can land in it.
fn long_program(n: i32) -> Vec<wattd_collectors::cgroup::trace::bpf::Insn> {
    use wattd_collectors::cgroup::trace::bpf::{Asm, R0, R2};
    let mut a = Asm::default();
    for i in 0..n {
        a.mov_imm(R2, i);
    }
    a.mov_imm(R0, 0).exit();
    a.finish().unwrap()
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// The verifier gives up with EAGAIN when a signal is pending for the loading thread (bpf(2));
/// the daemon has signal handlers, so a SIGHUP or SIGTERM during start-up must not cost it the
/// trace (it did in a CI run: "program for cgroup_mkdir refused: Resource temporarily
/// unavailable"). Real signals to the loading thread, spaced a few verifications apart: single
/// tries are abandoned, and loads with the default tries, one signal in each, all succeed,
/// retrying on the way.
#[test]
fn a_load_the_verifier_abandons_for_a_signal_is_tried_again() {
    use std::os::unix::thread::JoinHandleExt;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Arc;
    use std::time::Instant;
    use wattd_collectors::cgroup::trace::bpf;

    let test = "a_load_the_verifier_abandons_for_a_signal_is_tried_again";
    let text = long_program(50_000);
    let quiet = match bpf::load_raw_tracepoint_tries(&text, "wattd_test", 1) {
        Ok(_) => {
            let t = Instant::now();
            for _ in 0..3 {
                bpf::load_raw_tracepoint_tries(&text, "wattd_test", 1).unwrap();
            }
            t.elapsed() / 3
        }
        Err(e) => {
            wattd_testkit::need::skip(test, format!("loading eBPF programs ({})", e.error));
            return;
        }
    };
    let signal = libc::SIGRTMIN() + 7;
    // SAFETY: a handler that does nothing, installed for a real-time signal nothing else in
    // this test binary uses; the struct is zeroed (an empty mask) and only read by the call.
    let installed = unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = ignore_signal as *const () as usize;
        act.sa_flags = libc::SA_RESTART;
        libc::sigaction(signal, &act, std::ptr::null_mut())
    };
    assert_eq!(installed, 0, "{}", std::io::Error::last_os_error());

    // Loads with `tries` until `signals` signals were sent, one every `period` (with
    // `one_per_load`, and not before the load the last one was sent in has returned); gives
    // the loads' errors and how many loads the verifier abandoned.
    let storm = |tries: u32, signals: u32, one_per_load: bool| {
        let done = Arc::new(AtomicBool::new(false));
        let returned = Arc::new(AtomicU32::new(0));
        let loader = {
            let (done, returned, text) = (done.clone(), returned.clone(), text.clone());
            std::thread::spawn(move || {
                let (mut errors, mut abandoned, mut loads) = (Vec::new(), 0, 0);
                while !done.load(Ordering::Relaxed) {
                    loads += 1;
                    match bpf::load_raw_tracepoint_tries(&text, "wattd_test", tries) {
                        Ok((_, n)) => abandoned += n,
                        Err(e) => errors.push(format!("{} ({})", e.error, e.log)),
                    }
                    returned.fetch_add(1, Ordering::Relaxed);
                }
                (errors, abandoned, loads)
            })
        };
        let period = quiet * 3 + Duration::from_millis(1);
        for _ in 0..signals {
            std::thread::sleep(period);
            let before = returned.load(Ordering::Relaxed);
            // SAFETY: the loader thread is alive until `done` is set below and it is joined;
            // the signal's handler is installed above.
            let rc = unsafe { libc::pthread_kill(loader.as_pthread_t(), signal) };
            assert_eq!(rc, 0);
            let sent = Instant::now();
            while one_per_load && returned.load(Ordering::Relaxed) == before {
                assert!(
                    sent.elapsed() < Duration::from_secs(60),
                    "a load has not returned in a minute"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        done.store(true, Ordering::Relaxed);
        loader.join().unwrap()
    };

    let (errors, _, loads) = storm(1, 20, false);
    assert!(
        errors.iter().any(|e| e.contains("os error 11")),
        "20 signals over {loads} single loads of {quiet:?} each: none abandoned, the test \
         does not exercise the retry ({errors:?})"
    );
    // One signal per load, as a SIGHUP or two during start-up: timed signals alone, on a
    // machine slowed by other tests (loads taking longer than the period measured quiet), could
    // land in every one of a load's tries (seen: all ten of one load).
    let (errors, abandoned, loads) = storm(bpf::LOAD_TRIES, 20, true);
    assert!(
        errors.is_empty(),
        "{} of {loads} loads failed under signals: {errors:?}",
        errors.len()
    );
    assert!(
        abandoned > 0,
        "no load was abandoned: the retry was not exercised"
    );
}
