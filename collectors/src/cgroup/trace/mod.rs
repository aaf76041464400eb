//! The kernel's own CPU time of each run cgroup from its creation, kept after the cgroup is
//! removed: the usage source for a run that went away before it could be read, or before it was
//! even known (a *ghost*).
//!
//! Two raw-tracepoint programs, assembled at start with offsets from the running kernel's BTF:
//!
//! - on `cgroup_mkdir`: a cgroup made in the cgroup2 hierarchy under a *watched parent* (a
//!   family's, see [`CgroupTrace::watch_parent`]) gets an entry in `usage` (its cgroup id to
//!   nanoseconds, from 0) and in `names` (the parent's id and its name, to its id), unless an
//!   earlier cgroup of that name still holds the name (then it is not traced, and counted as
//!   such). A cgroup made under a traced one marks that one as having children (its time is
//!   then not all in its own entry, so it is not used);
//! - on `sched_stat_runtime`: upstream, the scheduler charges every slice of CPU time a task ran
//!   in `update_se`, which fires this tracepoint and then adds the same delta to the task's
//!   cgroup2 `cpu.stat` (`cgroup_account_cputime`); the program adds it to the entry of the
//!   task's cgroup (`p->cgroups->dfl_cgrp->kn->id`), when it has one. On the VM this was built
//!   on, a few slices the kernel charges never reach the program (below).
//!
//! So an entry is the cgroup's `usage_usec` in nanoseconds from its creation: it starts at
//! `mkdir` (no task can be moved in before the tracepoint, which runs under `cgroup_mutex`), and
//! outlives the cgroup until the tracker deletes it. The cgroup id is the directory's inode
//! number. Measured exact to the microsecond for runs that burn and fork, and for nearly all
//! that sleep: on the VM this was built on, a task that sleeps and wakes is now and then charged
//! a slice the program never sees (one task in 3,000, microseconds; of shell runs that start
//! `sleep` between bursts, about one in 12,000 came out up to 584 us short at once), never over
//! (see the README and ARCHITECTURE.md), so the tracker never bills a traced run below its last
//! read. (With proxy execution, upstream since 6.17 and off on that VM, the kernel charges the
//! cgroup of the task that donated its turn while the tracepoint names the one running: a lock
//! holder's slices would go to its own cgroup.) Costs: four kernel reads and a hash lookup
//! per scheduler update, for every task on the host (measured in the README); entries live only
//! for children of watched parents.

pub mod bpf;
pub mod btf;

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;

use bpf::{helper, Asm, Label, Map, Reg, FP, R0, R1, R2, R3, R4, R6, R7, R8};
use btf::{Btf, Param};

/// The longest name (in bytes) the trace keeps; a cgroup with a longer name is not traced.
pub const NAME_MAX: usize = 126;
const NAME_BYTES: usize = NAME_MAX + 2;
const NAME_KEY_BYTES: usize = 8 + NAME_BYTES;
/// Entries at most: runs (and other children of watched parents) alive or not yet settled.
/// From Linux 6.1 the maps take kernel memory as entries come; before, they are allocated whole
/// (see [`map_sizing`]), and smaller.
pub const ENTRIES_MAX: u32 = 65_536;
const ENTRIES_MAX_PREALLOCATED: u32 = 8_192;
const PARENTS_MAX: u32 = 4_096;
/// The `stats` slots: cgroups traced, cgroups that could not be, scheduler updates whose task's
/// cgroup could not be read.
const STAT_TRACED: i32 = 0;
const STAT_FAILED: i32 = 1;
const STAT_FAULTED: i32 = 2;
const STATS: u32 = 3;

/// Why the trace could not be set up (the tracker then works without it, and says so).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceError(pub String);

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the trace counted for one cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Traced {
    /// CPU time of its own tasks from its creation, in nanoseconds (`usage_usec` * 1000 and the
    /// sub-microsecond rest).
    pub ns: u64,
    /// A cgroup was made under it: its `usage_usec` counts theirs too, this entry does not.
    pub has_children: bool,
}

impl Traced {
    /// Its `usage_usec`, as the kernel would show it now, when the entry holds all of it.
    pub fn usage_us(&self) -> Option<u64> {
        (!self.has_children).then_some(self.ns / 1_000)
    }
}

/// What the programs counted since they were loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TraceStats {
    /// Cgroups made under a watched parent and traced from their creation.
    pub traced: u64,
    /// Cgroups made under a watched parent that could not be traced (a map full, a name
    /// longer than [`NAME_MAX`]).
    pub failed: u64,
    /// Slices of CPU time the trace did not count: the kernel skipped a program already running
    /// on that CPU (`recursion_misses` in the program's fdinfo), or the scheduler program could
    /// not read the task's cgroup (a faulted read). 0 in every test here.
    pub missed: u64,
}

/// A traced cgroup known by name: its parent's id, its name and its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedEntry {
    pub parent: u64,
    pub name: Vec<u8>,
    pub id: u64,
}

/// Every entry of the trace: the named ones, and the ids of counts without a name.
#[derive(Debug, Clone, Default)]
pub struct Entries {
    pub named: Vec<NamedEntry>,
    pub unnamed: Vec<u64>,
}

/// The loaded and attached programs and their maps. Dropping it detaches them.
#[derive(Debug)]
pub struct CgroupTrace {
    usage: Map,
    names: Map,
    parents: Map,
    stats: Map,
    /// The programs (kept loaded by their links too), for their fdinfo.
    progs: Vec<OwnedFd>,
    _links: Vec<OwnedFd>,
}

/// Kernel struct offsets the programs read through.
#[derive(Debug, Clone, Copy)]
struct Offsets {
    task_cgroups: i32,
    css_set_dfl_cgrp: i32,
    cgroup_kn: i32,
    cgroup_root: i32,
    root_hierarchy_id: i32,
    kn_id: i32,
    kn_parent: i32,
    kn_name: i32,
}

impl Offsets {
    fn from_btf(btf: &Btf) -> Result<Offsets, TraceError> {
        // Every name below, found in one pass over the string section.
        btf.prepare(&[
            "task_struct",
            "cgroups",
            "css_set",
            "dfl_cgrp",
            "cgroup",
            "kn",
            "root",
            "cgroup_root",
            "hierarchy_id",
            "kernfs_node",
            "id",
            "__parent",
            "parent",
            "name",
            "btf_trace_sched_stat_runtime",
            "btf_trace_cgroup_mkdir",
        ]);
        let member = |s: &str, m: &str, size: u32, pointer: bool| {
            let f = btf
                .member(s, m)
                .map_err(|e| TraceError(format!("kernel BTF: {e}")))?;
            if f.size != size || f.pointer != pointer {
                return Err(TraceError(format!(
                    "kernel BTF: {s}.{m} is {} bytes{}, not what the trace reads",
                    f.size,
                    if f.pointer { ", a pointer" } else { "" }
                )));
            }
            i32::try_from(f.offset).map_err(|_| TraceError(format!("{s}.{m}: offset too large")))
        };
        // `kernfs_node.parent` became `__parent` (RCU) in Linux 6.15.
        let kn_parent = member("kernfs_node", "__parent", 8, true)
            .or_else(|_| member("kernfs_node", "parent", 8, true))?;
        Ok(Offsets {
            task_cgroups: member("task_struct", "cgroups", 8, true)?,
            css_set_dfl_cgrp: member("css_set", "dfl_cgrp", 8, true)?,
            cgroup_kn: member("cgroup", "kn", 8, true)?,
            cgroup_root: member("cgroup", "root", 8, true)?,
            root_hierarchy_id: member("cgroup_root", "hierarchy_id", 4, false)?,
            kn_id: member("kernfs_node", "id", 8, false)?,
            kn_parent,
            kn_name: member("kernfs_node", "name", 8, true)?,
        })
    }
}

/// The flags and size of the hash maps the programs insert into. A tracing program with a map
/// that allocates at run time made the verifier print a kernel WARN before Linux 6.1 (the BPF
/// memory allocator), which panics a host booted with `panic_on_warn`: there the maps are
/// preallocated (about 2.6 MB of kernel memory at 8,192 entries).
fn map_sizing(release: &str) -> (u32, u32) {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    if (major, minor) >= (6, 1) {
        (bpf::NO_PREALLOC, ENTRIES_MAX)
    } else {
        (0, ENTRIES_MAX_PREALLOCATED)
    }
}

fn check_params(btf: &Btf, tp: &str, want: &[Param]) -> Result<(), TraceError> {
    let params = btf
        .tracepoint_params(tp)
        .map_err(|e| TraceError(format!("kernel BTF: {e}")))?;
    if params.len() < want.len() || params[..want.len()] != *want {
        return Err(TraceError(format!(
            "tracepoint {tp} takes {params:?}, not the {want:?} the trace reads"
        )));
    }
    Ok(())
}

/// `*(fp + to) = *(u64 *)(base + off)` through the probe-read helper; to `fail` when it faults.
fn read_kernel(a: &mut Asm, base: Reg, off: i32, to: i16, size: i32, fail: Label) {
    a.mov(R3, base)
        .add_imm(R3, off)
        .stack_ptr(R1, to)
        .mov_imm(R2, size)
        .call(helper::PROBE_READ_KERNEL)
        .jne_imm(R0, 0, fail);
}

/// `reg = *(u64 *)(fp + at)`, to `fail` when it is null.
fn load_nonnull(a: &mut Asm, reg: Reg, at: i16, fail: Label) {
    a.load64(reg, FP, at).jeq_imm(reg, 0, fail);
}

/// On `sched_stat_runtime(running, delta)`: the scheduler charging a task's slice, fired right
/// before the same delta goes to its cgroup.
fn sched_program(o: &Offsets, usage: &Map, stats: &Map) -> Result<Vec<bpf::Insn>, String> {
    let mut a = Asm::default();
    let out = a.label();
    let bad = a.label();
    // args[0]: the task charged; args[1]: the nanoseconds charged.
    a.load64(R6, R1, 8).load64(R7, R1, 0);
    read_kernel(&mut a, R7, o.task_cgroups, -8, 8, bad);
    load_nonnull(&mut a, R7, -8, bad);
    read_kernel(&mut a, R7, o.css_set_dfl_cgrp, -8, 8, bad);
    load_nonnull(&mut a, R7, -8, bad);
    read_kernel(&mut a, R7, o.cgroup_kn, -8, 8, bad);
    load_nonnull(&mut a, R7, -8, bad);
    read_kernel(&mut a, R7, o.kn_id, -8, 8, bad);
    a.load_map(R1, usage)
        .stack_ptr(R2, -8)
        .call(helper::MAP_LOOKUP_ELEM)
        .jeq_imm(R0, 0, out)
        .atomic_add64(R0, 0, R6)
        .ja(out)
        .bind(bad)
        .store32_imm(FP, -12, STAT_FAULTED);
    bump_stat(&mut a, stats, -12, out);
    a.bind(out).mov_imm(R0, 0).exit();
    a.finish()
}

/// `stats[*(u32 *)(fp + at)] += 1`, to `out` when the slot is not there.
fn bump_stat(a: &mut Asm, stats: &Map, at: i16, out: Label) {
    a.load_map(R1, stats)
        .stack_ptr(R2, at)
        .call(helper::MAP_LOOKUP_ELEM)
        .jeq_imm(R0, 0, out)
        .mov_imm(R1, 1)
        .atomic_add64(R0, 0, R1);
}

// The mkdir program's stack: scratch pointer, the cgroup's id, its parent's id, the hierarchy
// id, the stats index, the usage value, the names key.
const S_PTR: i16 = -8;
const S_ID: i16 = -16;
const S_PARENT: i16 = -24;
const S_HIERARCHY: i16 = -32;
const S_STAT: i16 = -36;
const S_VALUE: i16 = -56;
const S_KEY: i16 = -56 - NAME_KEY_BYTES as i16;

fn mkdir_program(o: &Offsets, maps: &CgroupTraceMaps<'_>) -> Result<Vec<bpf::Insn>, String> {
    let mut a = Asm::default();
    let (out, fail, fail_names, count) = (a.label(), a.label(), a.label(), a.label());
    a.load64(R6, R1, 0);
    // Only the cgroup2 hierarchy (hierarchy id 0): a v1 hierarchy's ids are another space.
    read_kernel(&mut a, R6, o.cgroup_root, S_PTR, 8, out);
    load_nonnull(&mut a, R3, S_PTR, out);
    read_kernel(&mut a, R3, o.root_hierarchy_id, S_HIERARCHY, 4, out);
    a.load32(R1, FP, S_HIERARCHY).jne_imm(R1, 0, out);
    read_kernel(&mut a, R6, o.cgroup_kn, S_PTR, 8, out);
    load_nonnull(&mut a, R7, S_PTR, out);
    read_kernel(&mut a, R7, o.kn_id, S_ID, 8, out);
    read_kernel(&mut a, R7, o.kn_parent, S_PTR, 8, out);
    load_nonnull(&mut a, R3, S_PTR, out);
    read_kernel(&mut a, R3, o.kn_id, S_PARENT, 8, out);
    // A traced parent now has a child.
    let unmarked = a.label();
    a.load_map(R1, maps.usage)
        .stack_ptr(R2, S_PARENT)
        .call(helper::MAP_LOOKUP_ELEM)
        .jeq_imm(R0, 0, unmarked)
        .store64_imm(R0, 8, 1)
        .bind(unmarked);
    a.load_map(R1, maps.parents)
        .stack_ptr(R2, S_PARENT)
        .call(helper::MAP_LOOKUP_ELEM)
        .jeq_imm(R0, 0, out);
    // The names key: the parent's id, the name zero-padded.
    for i in 0..(NAME_KEY_BYTES / 8) as i16 {
        a.store64_imm(FP, S_KEY + 8 * i, 0);
    }
    a.load64(R1, FP, S_PARENT).store64(FP, S_KEY, R1);
    read_kernel(&mut a, R7, o.kn_name, S_PTR, 8, out);
    load_nonnull(&mut a, R3, S_PTR, out);
    a.stack_ptr(R1, S_KEY + 8)
        .mov_imm(R2, NAME_BYTES as i32)
        .call(helper::PROBE_READ_KERNEL_STR)
        .jslt_imm(R0, 0, fail)
        // The buffer filled: the name may be cut, so it names nothing.
        .jsge_imm(R0, NAME_BYTES as i32, fail);
    a.store64_imm(FP, S_VALUE, 0)
        .store64_imm(FP, S_VALUE + 8, 0)
        .load_map(R1, maps.usage)
        .stack_ptr(R2, S_ID)
        .stack_ptr(R3, S_VALUE)
        .mov_imm(R4, bpf::NOEXIST as i32)
        .call(helper::MAP_UPDATE_ELEM)
        .jne_imm(R0, 0, fail)
        // A name still held by an earlier cgroup (made again before the tracker was done with
        // the first) is not taken over: the new one goes untraced, never the old one's count
        // to it or its to the old one.
        .load_map(R1, maps.names)
        .stack_ptr(R2, S_KEY)
        .stack_ptr(R3, S_ID)
        .mov_imm(R4, bpf::NOEXIST as i32)
        .call(helper::MAP_UPDATE_ELEM)
        .jne_imm(R0, 0, fail_names)
        .mov_imm(R8, STAT_TRACED)
        .ja(count)
        .bind(fail_names)
        .load_map(R1, maps.usage)
        .stack_ptr(R2, S_ID)
        .call(helper::MAP_DELETE_ELEM)
        .bind(fail)
        .mov_imm(R8, STAT_FAILED)
        .bind(count)
        .store32(FP, S_STAT, R8);
    bump_stat(&mut a, maps.stats, S_STAT, out);
    a.bind(out).mov_imm(R0, 0).exit();
    a.finish()
}

struct CgroupTraceMaps<'a> {
    usage: &'a Map,
    names: &'a Map,
    parents: &'a Map,
    stats: &'a Map,
}

fn name_key(parent: u64, name: &[u8]) -> Option<[u8; NAME_KEY_BYTES]> {
    if name.len() > NAME_MAX || name.contains(&0) {
        return None;
    }
    let mut key = [0u8; NAME_KEY_BYTES];
    key[..8].copy_from_slice(&parent.to_ne_bytes());
    key[8..8 + name.len()].copy_from_slice(name);
    Some(key)
}

impl CgroupTrace {
    /// Loads and attaches the programs, with offsets from `/sys/kernel/btf/vmlinux`. Needs
    /// CAP_BPF and CAP_PERFMON (or root), BTF, and the two tracepoints.
    pub fn load() -> Result<CgroupTrace, TraceError> {
        let btf = Btf::open(std::path::Path::new("/sys/kernel/btf/vmlinux"))
            .map_err(|e| TraceError(format!("kernel BTF: {e}")))?;
        Self::load_with(&btf)
    }

    pub fn load_with(btf: &Btf) -> Result<CgroupTrace, TraceError> {
        let offsets = Offsets::from_btf(btf)?;
        check_params(
            btf,
            "sched_stat_runtime",
            &[Param::Pointer(Some("task_struct".into())), Param::Value(8)],
        )?;
        check_params(
            btf,
            "cgroup_mkdir",
            &[Param::Pointer(Some("cgroup".into()))],
        )?;
        let map = |kind, k, v, n, flags, name: &str| {
            Map::create(kind, k, v, n, flags, name)
                .map_err(|e| TraceError(format!("bpf map {name}: {e}")))
        };
        let release = rustix::system::uname()
            .release()
            .to_string_lossy()
            .into_owned();
        let (flags, entries) = map_sizing(&release);
        let usage = map(bpf::MAP_HASH, 8, 16, entries, flags, "wattd_usage")?;
        let names = map(
            bpf::MAP_HASH,
            NAME_KEY_BYTES,
            8,
            entries,
            flags,
            "wattd_names",
        )?;
        let parents = map(bpf::MAP_HASH, 8, 8, PARENTS_MAX, 0, "wattd_parents")?;
        let stats = map(bpf::MAP_ARRAY, 4, 8, STATS, 0, "wattd_stats")?;
        let maps = CgroupTraceMaps {
            usage: &usage,
            names: &names,
            parents: &parents,
            stats: &stats,
        };
        let (mut progs, mut links) = (Vec::new(), Vec::new());
        // mkdir first: a cgroup is in `usage` before any of its time can be charged.
        for (tp, text) in [
            ("cgroup_mkdir", mkdir_program(&offsets, &maps)),
            (
                "sched_stat_runtime",
                sched_program(&offsets, &usage, &stats),
            ),
        ] {
            let text = text.map_err(|e| TraceError(format!("program for {tp}: {e}")))?;
            let prog = bpf::load_raw_tracepoint(&text, "wattd_trace").map_err(|e| {
                TraceError(format!(
                    "program for {tp} refused: {} (verifier: {})",
                    e.error, e.log
                ))
            })?;
            let link = bpf::attach_raw_tracepoint(tp, &prog)
                .map_err(|e| TraceError(format!("attaching to {tp}: {e}")))?;
            links.push(link);
            progs.push(prog);
        }
        Ok(CgroupTrace {
            usage,
            names,
            parents,
            stats,
            progs,
            _links: links,
        })
    }

    /// Cgroups made from now on under the cgroup with id `parent` are traced.
    pub fn watch_parent(&self, parent: u64) -> io::Result<()> {
        self.parents.update(&parent.to_ne_bytes(), &[0; 8], 0)
    }

    pub fn unwatch_parent(&self, parent: u64) -> io::Result<()> {
        self.parents.delete(&parent.to_ne_bytes()).map(|_| ())
    }

    /// The id of the traced cgroup `name` under `parent`, if it was made while traced (the
    /// first of that name since the name was last forgotten: one made again under a name still
    /// held is not traced).
    pub fn id_of(&self, parent: u64, name: &[u8]) -> io::Result<Option<u64>> {
        let Some(key) = name_key(parent, name) else {
            return Ok(None);
        };
        let mut v = [0u8; 8];
        Ok(self
            .names
            .lookup(&key, &mut v)?
            .then(|| u64::from_ne_bytes(v)))
    }

    /// What was counted for the cgroup `id`, if it is traced.
    pub fn usage(&self, id: u64) -> io::Result<Option<Traced>> {
        let mut v = [0u8; 16];
        if !self.usage.lookup(&id.to_ne_bytes(), &mut v)? {
            return Ok(None);
        }
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&v[8 * i..8 * i + 8]);
            u64::from_ne_bytes(w)
        };
        Ok(Some(Traced {
            ns: word(0),
            has_children: word(1) != 0,
        }))
    }

    /// Drops the cgroup `id`'s entries (its name's only while the name still means it).
    pub fn forget(&self, id: u64, parent: u64, name: &[u8]) -> io::Result<()> {
        if self.id_of(parent, name)? == Some(id) {
            if let Some(key) = name_key(parent, name) {
                self.names.delete(&key)?;
            }
        }
        self.forget_usage(id)
    }

    /// Drops the cgroup `id`'s count (its name, if any, stays).
    pub fn forget_usage(&self, id: u64) -> io::Result<()> {
        self.usage.delete(&id.to_ne_bytes()).map(|_| ())
    }

    /// Stops watching `parent` and drops the entries of every cgroup traced under it.
    pub fn forget_parent(&self, parent: u64) -> io::Result<()> {
        self.unwatch_parent(parent)?;
        let mut id = [0u8; 8];
        for k in self.names.keys()? {
            if k[..8] != parent.to_ne_bytes() {
                continue;
            }
            if self.names.lookup(&k, &mut id)? {
                self.usage.delete(&id)?;
            }
            self.names.delete(&k)?;
        }
        Ok(())
    }

    /// What the programs counted: from the maps, and the kernel's skipped runs
    /// ([`Self::skipped`]).
    pub fn stats(&self) -> io::Result<TraceStats> {
        let mut s = self.counts()?;
        s.missed += self.skipped()?;
        Ok(s)
    }

    /// What the programs counted in their `stats` map (three `bpf(2)` lookups, 7% of an idle
    /// 100 Hz tick when read at every one; `missed` holds only the faulted reads). The tracker
    /// reads it when cgroups may have been made, or once a second.
    pub fn counts(&self) -> io::Result<TraceStats> {
        let mut v = [0u8; 8];
        let mut read = |i: i32| -> io::Result<u64> {
            self.stats.lookup(&(i as u32).to_ne_bytes(), &mut v)?;
            Ok(u64::from_ne_bytes(v))
        };
        Ok(TraceStats {
            traced: read(STAT_TRACED)?,
            failed: read(STAT_FAILED)?,
            missed: read(STAT_FAULTED)?,
        })
    }

    /// Runs of the programs the kernel skipped (`recursion_misses` in their fdinfo): a file
    /// read per program, so the tracker reads it at rescans, not every tick.
    pub fn skipped(&self) -> io::Result<u64> {
        let mut skipped = 0;
        for p in &self.progs {
            use std::os::fd::AsRawFd as _;
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", p.as_raw_fd()))?;
            skipped += info
                .lines()
                .find_map(|l| l.strip_prefix("recursion_misses:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
        Ok(skipped)
    }

    /// Every entry, named or not.
    pub fn entries_list(&self) -> io::Result<Entries> {
        let mut named = Vec::new();
        let mut id = [0u8; 8];
        for key in self.names.keys()? {
            if !self.names.lookup(&key, &mut id)? {
                continue;
            }
            let (parent, name) = key.split_at(8);
            let mut p = [0u8; 8];
            p.copy_from_slice(parent);
            let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            named.push(NamedEntry {
                parent: u64::from_ne_bytes(p),
                name: name[..len].to_vec(),
                id: u64::from_ne_bytes(id),
            });
        }
        let with_name: std::collections::HashSet<u64> = named.iter().map(|e| e.id).collect();
        let unnamed = self
            .usage
            .keys()?
            .into_iter()
            .filter_map(|k| <[u8; 8]>::try_from(k.as_slice()).ok())
            .map(u64::from_ne_bytes)
            .filter(|id| !with_name.contains(id))
            .collect();
        Ok(Entries { named, unnamed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_are_preallocated_before_linux_6_1() {
        assert_eq!(
            map_sizing("6.18.44-fc-v1252"),
            (bpf::NO_PREALLOC, ENTRIES_MAX)
        );
        assert_eq!(map_sizing("6.1.0"), (bpf::NO_PREALLOC, ENTRIES_MAX));
        assert_eq!(map_sizing("10.0"), (bpf::NO_PREALLOC, ENTRIES_MAX));
        assert_eq!(map_sizing("6.0.19"), (0, ENTRIES_MAX_PREALLOCATED));
        assert_eq!(
            map_sizing("5.15.0-91-generic"),
            (0, ENTRIES_MAX_PREALLOCATED)
        );
        assert_eq!(map_sizing("garbage"), (0, ENTRIES_MAX_PREALLOCATED));
    }

    #[test]
    fn a_name_key_holds_the_parent_and_the_name_zero_padded() {
        let k = name_key(7, b"run-a").expect("a key");
        assert_eq!(&k[..8], &7u64.to_ne_bytes());
        assert_eq!(&k[8..13], b"run-a");
        assert!(k[13..].iter().all(|&b| b == 0));
        assert!(name_key(7, &[b'r'; NAME_MAX]).is_some());
        assert!(name_key(7, &[b'r'; NAME_MAX + 1]).is_none());
        assert!(name_key(7, b"a\0b").is_none());
    }
}
