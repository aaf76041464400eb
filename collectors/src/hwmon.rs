//! hwmon energy and power sensors (the kernel's `Documentation/hwmon/sysfs-interface.rst`):
//! `energy<N>_input` is cumulative microjoules, `power<N>_input` and `power<N>_average`
//! microwatts, `<kind><N>_label` names a channel and `<kind><N>_enable` = 0 turns it off.
//!
//! What a channel measures is only known from its driver, so only drivers whose meaning is
//! documented are billed, and nothing is ever summed with a meter that already covers it:
//! - `i915` and `xe` (Intel GPUs, `sysfs-driver-intel-{i915,xe}-hwmon`): the card's energy
//!   (`xe`: the channel labelled `card`, else `pkg`; `i915`: `energy1_input`), as domain `gpu`
//!   under index [`GPU_INDEX_BASE`] + n (n by PCI address), beside the NVIDIA GPUs' 0, 1, ...
//!   The driver accumulates its 32-bit register into a 64-bit count while it is read often
//!   (wattd reads every tick); a count that goes back is a reset (driver reload), a gap. A
//!   GPU with only a power reading has it integrated per tick, marked estimated. Per-tile
//!   devices (`i915_gt0`) and the `pkg` channel beside `card` are inside the card: listed, never
//!   summed.
//! - `amd_energy` reads the same RAPL registers as the powercap and perf sources: never used.
//! - A channel the operator declares (`[hwmon] power`, [`Declared`]): the operator says what it
//!   covers (an ARM server's CPU power, which has no RAPL: NVIDIA Grace's ACPI power meters
//!   labelled `CPU Power Socket 0`, say) and wattd bills it as that meter: `package` N, `dram` N
//!   or `psys`, power integrated per tick and marked estimated (an energy channel: measured).
//!   It takes a meter no earlier source serves (on a host with RAPL, RAPL's package stays and
//!   the declaration is on standby), and one meter is never served by two channels.
//! - Everything else (an ACPI power meter, a board's voltage regulators, a power-only sensor of
//!   an ARM SoC not declared) is listed with why it is not billed: wattd cannot tell what it
//!   covers, and billing a sensor that overlaps a metered component would count that energy
//!   twice.
//!
//! A channel's label is its `<kind><N>_label`, else (ACPI `power_meter`) its `<kind><N>_oem_info`.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::counter::{EnergyCounter, EnergyUnit, PowerIntegrator};
use crate::domain::{Domain, DomainReading, Meter, MeterKey, Quality, SourceKind};
use crate::error::HostError;
use crate::hostfs::{read_bounded, HostRoot, KeptFile};
use crate::powercap::CEILING_SAFETY_FACTOR;

/// GPUs measured through hwmon are numbered from here in `MeterKey::package`, so they never
/// share an index with an NVIDIA GPU (NVML's 0, 1, ...).
pub const GPU_INDEX_BASE: u32 = 1000;
/// Most hwmon devices looked at (a bound on hostile trees).
const DEVICES_MAX: usize = 256;
/// Highest channel number looked at per kind.
const CHANNELS_MAX: u32 = 32;
/// Largest `name`, `label` or `enable` attribute read.
const ATTR_MAX: usize = 256;
const HINT: &str = "hwmon sensor";
/// How often a channel whose device went away is looked for again.
const RESCAN_EVERY: Duration = Duration::from_secs(5);

/// What a channel reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelKind {
    /// `energy<N>_input`, cumulative microjoules.
    Energy,
    /// `power<N>_input` (or `power<N>_average`), microwatts.
    Power,
}

impl ChannelKind {
    /// The attribute names' prefix: `energy` (`energy1_input`), `power`.
    pub fn prefix(self) -> &'static str {
        match self {
            ChannelKind::Energy => "energy",
            ChannelKind::Power => "power",
        }
    }
}

/// One energy or power channel of a hwmon device.
#[derive(Clone, Debug, Serialize)]
pub struct Channel {
    pub kind: ChannelKind,
    pub index: u32,
    pub label: Option<String>,
    /// The file read, relative to the host root.
    pub file: String,
    /// `false` when `<kind><N>_enable` reads 0.
    pub enabled: bool,
}

/// One device under `/sys/class/hwmon`.
#[derive(Clone, Debug, Serialize)]
pub struct Device {
    /// `hwmon3`.
    pub dir: String,
    /// The driver's `name` attribute (`xe`, `i915`, `amd_energy`, `power_meter`).
    pub name: String,
    /// The parent device (the `device` link's target name: a PCI address for a GPU).
    pub device: Option<String>,
    pub channels: Vec<Channel>,
}

/// Every hwmon device under `root` that has an energy or power channel, sorted by directory.
/// A tree without `/sys/class/hwmon` has none; unreadable devices are skipped.
pub fn scan(root: &HostRoot) -> Vec<Device> {
    let base = root.join("sys/class/hwmon");
    let Ok(entries) = std::fs::read_dir(&base) else {
        return Vec::new();
    };
    // Names first (bounded), sorted, so which devices are kept does not depend on the
    // directory's order.
    let mut dirs: Vec<String> = entries
        .take(DEVICES_MAX * 16)
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|d| printable(d))
        .collect();
    dirs.sort();
    dirs.into_iter()
        .take(DEVICES_MAX)
        .filter_map(|dir| device(&base.join(&dir), dir))
        .collect()
}

/// No control characters (a name printed by `wattd probe` must not move the terminal).
fn printable(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| !c.is_control())
}

/// A small attribute, trimmed; `None` unless it is a regular file (a FIFO in a hostile tree
/// would block the read) holding printable text.
fn attr(path: &Path) -> Option<String> {
    if !path.is_file() {
        return None;
    }
    read_bounded(path, ATTR_MAX, HINT)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| printable(s))
}

/// A channel's label: `<prefix><N>_label`, else (ACPI `power_meter`) `<prefix><N>_oem_info`.
fn channel_label(dir: &Path, prefix: &str, index: u32) -> Option<String> {
    attr(&dir.join(format!("{prefix}{index}_label")))
        .or_else(|| attr(&dir.join(format!("{prefix}{index}_oem_info"))))
}

fn device(path: &Path, dir: String) -> Option<Device> {
    let name = attr(&path.join("name")).unwrap_or_else(|| "?".to_owned());
    let device = std::fs::read_link(path.join("device"))
        .ok()
        .and_then(|t| t.file_name()?.to_str().map(str::to_owned))
        .filter(|d| printable(d));
    let mut channels = Vec::new();
    for (kind, prefix, files) in [
        (
            ChannelKind::Energy,
            ChannelKind::Energy.prefix(),
            &["input"][..],
        ),
        (
            ChannelKind::Power,
            ChannelKind::Power.prefix(),
            &["input", "average"][..],
        ),
    ] {
        for index in 1..=CHANNELS_MAX {
            let Some(file) = files
                .iter()
                .map(|f| format!("{prefix}{index}_{f}"))
                .find(|f| path.join(f).is_file())
            else {
                continue;
            };
            let enabled =
                attr(&path.join(format!("{prefix}{index}_enable"))).as_deref() != Some("0");
            channels.push(Channel {
                kind,
                index,
                label: channel_label(path, prefix, index),
                file: format!("sys/class/hwmon/{dir}/{file}"),
                enabled,
            });
        }
    }
    (!channels.is_empty()).then_some(Device {
        dir,
        name,
        device,
        channels,
    })
}

/// What became of one channel.
#[derive(Clone, Debug, Serialize)]
pub struct Decision {
    pub dir: String,
    pub name: String,
    pub device: Option<String>,
    pub channel: Channel,
    /// The meter it serves when chosen (or would serve).
    pub key: Option<MeterKey>,
    /// `chosen`, `informational` (inside a chosen channel, never summed), `duplicate` (the same
    /// registers as another source), `unusable` (disabled, unreadable) or `not_billed` (wattd
    /// cannot tell what it covers).
    pub status: &'static str,
    pub detail: Option<String>,
}

fn is_intel_gpu(name: &str) -> bool {
    name == "xe" || name == "i915"
}

/// A channel whose meaning the operator declares (`[hwmon] power`): which meter it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Declared {
    /// The driver's `name` attribute (`power_meter`, `apm_xgene`).
    pub driver: String,
    /// The channel's label (`CPU Power Socket 0`), or its file stem (`power1`, `energy2`).
    pub channel: String,
    /// The device link's name, where several devices share the driver (`ACPI000D:00`).
    pub device: Option<String>,
    /// The meter it is: domain `package` or `dram` with a package, or `psys`.
    pub key: MeterKey,
}

impl Declared {
    fn matches(&self, d: &Device, c: &Channel) -> bool {
        let stem = format!("{}{}", c.kind.prefix(), c.index);
        d.name == self.driver
            && self
                .device
                .as_ref()
                .map_or(true, |x| d.device.as_ref() == Some(x))
            && (c.label.as_deref() == Some(&*self.channel) || stem == self.channel)
    }
}

/// How each declaration fared: the one channel it names (device and channel positions in
/// `devices`), or why it names none. A declaration is refused when it matches no channel, more
/// than one (hwmon numbers change between boots: which one would be billed must not), a disabled
/// channel, or one wattd already knows the meaning of (an Intel GPU's, `amd_energy`'s RAPL
/// registers, an AMD GPU's that AMD SMI measures), and two declarations naming the same channel
/// are both refused.
fn resolve(devices: &[Device], declared: &[Declared]) -> Vec<Result<(usize, usize), String>> {
    let mut out: Vec<Result<(usize, usize), String>> = declared
        .iter()
        .map(|x| {
            let hits: Vec<(usize, usize)> = devices
                .iter()
                .enumerate()
                .flat_map(|(i, d)| {
                    d.channels
                        .iter()
                        .enumerate()
                        .filter(move |(_, c)| x.matches(d, c))
                        .map(move |(j, _)| (i, j))
                })
                .collect();
            match hits[..] {
                [] => Err("matches no sensor under /sys/class/hwmon".to_owned()),
                [(i, j)] => {
                    let (d, c) = (&devices[i], &devices[i].channels[j]);
                    let (status, why) = verdict(d, c, None);
                    if !c.enabled {
                        Err(format!(
                            "{} is disabled by the driver (_enable = 0)",
                            c.file
                        ))
                    } else if status != "not_billed" || d.name == "amdgpu" {
                        Err(format!(
                            "{} cannot be declared: {}",
                            c.file,
                            why.unwrap_or_default()
                        ))
                    } else {
                        Ok((i, j))
                    }
                }
                _ => Err(format!(
                    "matches {} channels ({}): add `device`, or a label that names one",
                    hits.len(),
                    hits.iter()
                        .map(|&(i, j)| devices[i].channels[j].file.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            }
        })
        .collect();
    let named: Vec<Option<(usize, usize)>> = out.iter().map(|r| r.as_ref().ok().copied()).collect();
    for (a, ch) in named.iter().enumerate() {
        let Some(ch) = ch else { continue };
        if let Some(b) = (0..named.len()).find(|&b| b != a && named[b] == Some(*ch)) {
            out[a] = Err(format!("names the same channel as entry {}", b + 1));
        }
    }
    out
}

/// Every declaration that is not used, in words for `wattd probe` and the start-up log: its
/// meter is not measured from it (an estimate, another source, or nothing stands in).
pub fn declaration_problems(devices: &[Device], declared: &[Declared]) -> Vec<String> {
    resolve(devices, declared)
        .into_iter()
        .zip(declared)
        .enumerate()
        .filter_map(|(n, (r, x))| {
            r.err().map(|why| {
                format!(
                    "[hwmon] power entry {} ({} {}{}) {why}: {} is not measured from it",
                    n + 1,
                    x.driver,
                    x.channel,
                    x.device
                        .as_deref()
                        .map(|d| format!(", device {d}"))
                        .unwrap_or_default(),
                    x.key
                )
            })
        })
        .collect()
}

/// Decides every channel of `devices` (as [`scan`] returns them), with no declared channel.
pub fn decide(devices: &[Device]) -> Vec<Decision> {
    decide_with(devices, &[])
}

/// Decides every channel of `devices`; `declared` names the meters of channels wattd cannot
/// tell the meaning of on its own (see [`resolve`] for those refused, and
/// [`declaration_problems`] for what is said of them).
pub fn decide_with(devices: &[Device], declared: &[Declared]) -> Vec<Decision> {
    let resolved = resolve(devices, declared);
    let mut taken: std::collections::BTreeSet<MeterKey> = std::collections::BTreeSet::new();
    // Intel GPUs numbered by PCI address, stable across reboots (hwmon numbers are not).
    let mut gpus: Vec<&Device> = devices.iter().filter(|d| is_intel_gpu(&d.name)).collect();
    gpus.sort_by(|a, b| a.device.cmp(&b.device).then(a.dir.cmp(&b.dir)));
    let mut out = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        let ordinal = gpus.iter().position(|g| g.dir == d.dir);
        let key = ordinal.map(|n| MeterKey {
            domain: Domain::Gpu,
            package: Some(GPU_INDEX_BASE + n as u32),
            die: None,
        });
        let billed = ordinal.and_then(|_| billed_channel(d));
        for (j, c) in d.channels.iter().enumerate() {
            let (mut status, mut detail) = verdict(d, c, billed);
            let mut key = key.filter(|_| status == "chosen" || status == "informational");
            if let Some(n) = resolved
                .iter()
                .position(|r| r.as_ref().ok() == Some(&(i, j)))
            {
                let x = &declared[n];
                (status, detail) = if taken.insert(x.key) {
                    key = Some(x.key);
                    let what = match c.kind {
                        ChannelKind::Energy => "its energy counter (measured)",
                        ChannelKind::Power => "power integrated per tick (estimated)",
                    };
                    (
                        "chosen",
                        Some(format!("declared in [hwmon] power: {}, {what}", x.key)),
                    )
                } else {
                    (
                        "duplicate",
                        Some(format!("another declared channel serves {}", x.key)),
                    )
                };
            } else if let Some(n) = declared.iter().position(|x| x.matches(d, c)) {
                if status == "not_billed" {
                    status = "unusable";
                    detail = Some(format!(
                        "[hwmon] power entry {} is not used: {}",
                        n + 1,
                        resolved[n].as_ref().err().map_or("", |e| e.as_str())
                    ));
                }
            }
            out.push(Decision {
                dir: d.dir.clone(),
                name: d.name.clone(),
                device: d.device.clone(),
                channel: c.clone(),
                key,
                status,
                detail,
            });
        }
    }
    out
}

/// The channel of an Intel GPU that carries the card's energy: `card`, else `pkg`, else the
/// first energy channel; a power channel only where there is no energy channel.
fn billed_channel(d: &Device) -> Option<u32> {
    let energy = || {
        d.channels
            .iter()
            .filter(|c| c.enabled && c.kind == ChannelKind::Energy)
    };
    let labelled = |l: &str| energy().find(|c| c.label.as_deref() == Some(l));
    labelled("card")
        .or_else(|| labelled("pkg"))
        .or_else(|| energy().next())
        .or_else(|| {
            d.channels
                .iter()
                .find(|c| c.enabled && c.kind == ChannelKind::Power)
        })
        .map(slot)
}

/// A channel's identity within its device: kind and number.
fn slot(c: &Channel) -> u32 {
    match c.kind {
        ChannelKind::Energy => c.index,
        ChannelKind::Power => CHANNELS_MAX + c.index,
    }
}

fn verdict(d: &Device, c: &Channel, billed: Option<u32>) -> (&'static str, Option<String>) {
    if !c.enabled {
        return (
            "unusable",
            Some("disabled by the driver (_enable = 0)".into()),
        );
    }
    if d.name == "amd_energy" {
        return (
            "duplicate",
            Some(
                "amd_energy reads the same RAPL registers as the powercap and perf sources: \
                 never summed with them"
                    .into(),
            ),
        );
    }
    if is_intel_gpu(&d.name) {
        return if billed == Some(slot(c)) {
            let what = match c.kind {
                ChannelKind::Energy => "Intel GPU energy",
                ChannelKind::Power => "Intel GPU power, integrated per tick (estimated)",
            };
            ("chosen", Some(what.into()))
        } else {
            (
                "informational",
                Some("inside the GPU's billed channel: never summed with it".into()),
            )
        };
    }
    if d.name.starts_with("i915_gt") || d.name.starts_with("xe_gt") {
        return (
            "informational",
            Some("one tile of an Intel GPU, inside the card's energy".into()),
        );
    }
    let why = match d.name.as_str() {
        "power_meter" => {
            "an ACPI power meter (whole node or a part of it): not a component meter unless \
             declared in [hwmon] power; the wall is reconciled from the BMC ([platform])"
        }
        "amdgpu" => "an AMD GPU: measured through AMD SMI ([gpu] amd_smi), never summed with it",
        _ => {
            "wattd cannot tell what this driver's sensor covers (declare it in [hwmon] power if \
             you can); billing it beside the metered components could count their energy twice"
        }
    };
    ("not_billed", Some(why.into()))
}

/// How the meter reads: the deadline of one tick's reads, and the GPUs' ceiling.
#[derive(Clone, Copy, Debug)]
pub struct MeterOptions {
    /// A read that has not answered by then is a `SOURCE_FAILURE` gap of every channel (a
    /// GPU's hwmon read wakes the device and takes a driver lock: slow, or stuck on a wedged
    /// GPU). The stuck read is not waited for again.
    pub read_timeout: Duration,
    /// The most one GPU can draw, watts, before the safety factor (`[gpu] max_watts`).
    pub gpu_max_watts: u64,
}

impl Default for MeterOptions {
    fn default() -> Self {
        MeterOptions {
            read_timeout: Duration::from_millis(500),
            gpu_max_watts: Domain::Gpu.default_max_watts(),
        }
    }
}

/// The chosen channels, read once per tick on a thread of their own (`wattd-hwmon`) with a
/// deadline.
#[derive(Debug)]
pub struct HwmonMeter {
    channels: Vec<Open>,
    tx: mpsc::SyncSender<u64>,
    rx: mpsc::Receiver<(u64, Vec<ChannelRead>)>,
    /// The last request sent, and whether its answer is still owed.
    seq: u64,
    pending: bool,
    timeout: Duration,
    /// The reading thread's end was warned about (once).
    warned_gone: bool,
}

#[derive(Debug)]
struct Open {
    key: MeterKey,
    /// `pci:<address>` (or the hwmon directory) for the records' `device_uuid`.
    device_id: Arc<str>,
    path: PathBuf,
    reading: Reading,
}

#[derive(Debug)]
enum Reading {
    Energy(EnergyCounter),
    /// The integrator and the meter's own clock (the sum of the elapsed times it was given).
    Power(PowerIntegrator, u64),
}

/// One channel's answer from the reading thread: its value and whether it came from a device
/// found again (a new baseline), or why there is none.
type ChannelRead = Result<(u64, bool), HostError>;

/// What the reading thread keeps per channel: where to find it again if its device goes away
/// (a driver reload makes a new hwmon device, maybe under another number).
struct Reader {
    name: String,
    device: Option<String>,
    kind: ChannelKind,
    label: Option<String>,
    index: u32,
    /// The file chosen at start (opened again as it is when there is no device link).
    path: PathBuf,
    file: Option<KeptFile>,
    /// When the device may next be looked for, after a look that did not find it.
    next_scan: Option<Instant>,
}

impl Reader {
    /// The channel's value, and whether it came from a device found again (a new baseline).
    fn read(&mut self, root: &HostRoot) -> Result<(u64, bool), HostError> {
        if let Some(f) = &self.file {
            match f.read_u64() {
                Ok(v) => return Ok((v, false)),
                // A device that went away reads ENODEV on sysfs (an empty read where a tree is
                // rewritten); anything else is this file's answer.
                Err(e) if !(e.is_gone() || matches!(e, HostError::Empty { .. })) => return Err(e),
                Err(_) => self.file = None,
            }
        }
        let missing = || HostError::NotFound {
            path: root.join(format!(
                "sys/class/hwmon/*/{}{}_input ({} {})",
                self.kind.prefix(),
                self.index,
                self.name,
                self.device.as_deref().unwrap_or("no device link")
            )),
        };
        // While the device stays away, look for it at most every RESCAN_EVERY.
        let now = Instant::now();
        if self.next_scan.is_some_and(|t| now < t) {
            return Err(missing());
        }
        self.next_scan = Some(now + RESCAN_EVERY);
        // Without a device link another device could answer to the same name: only the
        // original file is opened again, and only while its directory still holds the same
        // driver's channel with the same label (hwmon numbers are reused across reloads).
        let path = match &self.device {
            Some(_) => self.locate(root).ok_or_else(missing)?,
            None if self.still_ours(&self.path) => self.path.clone(),
            None => return Err(missing()),
        };
        let f = KeptFile::open(&path, HINT)?;
        let v = f.read_u64();
        self.file = Some(f);
        self.next_scan = None;
        v.map(|v| (v, true))
    }

    /// `path`'s directory still holds this driver's channel under this label.
    fn still_ours(&self, path: &Path) -> bool {
        let Some(dir) = path.parent() else {
            return false;
        };
        attr(&dir.join("name")).unwrap_or_else(|| "?".to_owned()) == self.name
            && channel_label(dir, self.kind.prefix(), self.index) == self.label
    }

    fn locate(&self, root: &HostRoot) -> Option<PathBuf> {
        scan(root)
            .into_iter()
            .filter(|d| d.name == self.name && d.device == self.device)
            .flat_map(|d| d.channels)
            .find(|c| {
                c.kind == self.kind
                    && c.enabled
                    && match &self.label {
                        Some(l) => c.label.as_ref() == Some(l),
                        None => c.label.is_none() && c.index == self.index,
                    }
            })
            .map(|c| root.join(&c.file))
    }
}

impl HwmonMeter {
    /// Opens the chosen decisions' files and starts the reading thread; those that cannot be
    /// opened are returned with why (their keys must not be chosen).
    pub fn open(
        root: &HostRoot,
        decisions: &[Decision],
        opts: MeterOptions,
    ) -> (Option<HwmonMeter>, Vec<(MeterKey, HostError)>) {
        let mut channels = Vec::new();
        let mut readers = Vec::new();
        let mut failed = Vec::new();
        for d in decisions.iter().filter(|d| d.status == "chosen") {
            let Some(key) = d.key else { continue };
            let max_watts = match key.domain {
                Domain::Gpu => opts.gpu_max_watts,
                other => other.default_max_watts(),
            };
            let ceiling_uw = max_watts
                .saturating_mul(1_000_000)
                .saturating_mul(CEILING_SAFETY_FACTOR);
            let path = root.join(&d.channel.file);
            // Opened and read once here: a file that cannot be read now is not chosen.
            let file = match KeptFile::open(&path, HINT).and_then(|f| f.read_u64().map(|_| f)) {
                Ok(f) => f,
                Err(e) => {
                    failed.push((key, e));
                    continue;
                }
            };
            readers.push(Reader {
                name: d.name.clone(),
                device: d.device.clone(),
                kind: d.channel.kind,
                label: d.channel.label.clone(),
                index: d.channel.index,
                path: path.clone(),
                file: Some(file),
                next_scan: None,
            });
            channels.push(Open {
                key,
                device_id: d
                    .device
                    .as_deref()
                    .map_or_else(|| format!("hwmon:{}", d.dir), |a| format!("pci:{a}"))
                    .into(),
                path,
                reading: match d.channel.kind {
                    ChannelKind::Energy => Reading::Energy(EnergyCounter::new(
                        None,
                        EnergyUnit::MicroJoule,
                        ceiling_uw,
                    )),
                    ChannelKind::Power => Reading::Power(PowerIntegrator::new(ceiling_uw), 0),
                },
            });
        }
        if channels.is_empty() {
            return (None, failed);
        }
        let root = root.clone();
        let read = move || readers.iter_mut().map(|r| r.read(&root)).collect();
        match Self::start(channels, read, opts.read_timeout) {
            Ok(m) => (Some(m), failed),
            Err((channels, e)) => {
                for c in &channels {
                    failed.push((c.key, HostError::io(&c.path, e.kind().into(), HINT)));
                }
                (None, failed)
            }
        }
    }

    /// A meter whose every channel is an energy counter in microjoules answered by `read` (one
    /// value per key, in order), on the reading thread with `timeout` as deadline: for tests of
    /// the deadline, with a `read` that blocks as a wedged driver would.
    #[doc(hidden)]
    pub fn with_reader(
        keys: &[MeterKey],
        mut read: impl FnMut() -> Vec<Result<u64, HostError>> + Send + 'static,
        timeout: Duration,
    ) -> std::io::Result<HwmonMeter> {
        let channels = keys
            .iter()
            .map(|&key| Open {
                key,
                device_id: "test".into(),
                path: PathBuf::from(format!("{key}")),
                reading: Reading::Energy(EnergyCounter::new(
                    None,
                    EnergyUnit::MicroJoule,
                    u64::MAX,
                )),
            })
            .collect();
        let read = move || read().into_iter().map(|r| r.map(|v| (v, false))).collect();
        Self::start(channels, read, timeout).map_err(|(_, e)| e)
    }

    fn start(
        channels: Vec<Open>,
        mut read: impl FnMut() -> Vec<ChannelRead> + Send + 'static,
        timeout: Duration,
    ) -> Result<HwmonMeter, (Vec<Open>, std::io::Error)> {
        let (tx, requests) = mpsc::sync_channel::<u64>(1);
        let (answers, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("wattd-hwmon".into())
            .spawn(move || {
                while let Ok(seq) = requests.recv() {
                    if answers.send((seq, read())).is_err() {
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            return Err((channels, e));
        }
        Ok(HwmonMeter {
            channels,
            tx,
            rx,
            seq: 0,
            pending: false,
            timeout,
            warned_gone: false,
        })
    }

    /// One answer from the reading thread for this tick, or why there is none.
    fn read_all(&mut self) -> Result<Vec<ChannelRead>, String> {
        if self.pending {
            // The previous request's answer is late: take it if it has come, and throw it away.
            match self.rx.try_recv() {
                Ok((seq, _)) if seq == self.seq => self.pending = false,
                Ok(_) => {}
                Err(mpsc::TryRecvError::Empty) => {
                    return Err("a previous read is still blocked in the driver".into())
                }
                Err(mpsc::TryRecvError::Disconnected) => {
                    return Err("the reading thread is gone".into())
                }
            }
        }
        self.seq += 1;
        match self.tx.try_send(self.seq) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(_)) => {
                return Err("a previous read is still queued".into())
            }
            Err(mpsc::TrySendError::Disconnected(_)) => {
                return Err("the reading thread is gone".into())
            }
        }
        self.pending = true;
        match self.rx.recv_timeout(self.timeout) {
            Ok((seq, values)) if seq == self.seq => {
                self.pending = false;
                Ok(values)
            }
            Ok(_) => Err("an answer out of order".into()),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
                "no answer within {} ms (a GPU waking slowly, or wedged)",
                self.timeout.as_millis()
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err("the reading thread is gone".into()),
        }
    }
}

impl Meter for HwmonMeter {
    fn source(&self) -> SourceKind {
        SourceKind::Hwmon
    }

    fn keys(&self) -> Vec<MeterKey> {
        self.channels.iter().map(|c| c.key).collect()
    }

    /// A GPU's identity for its records; none for a declared CPU or platform meter.
    fn device_id(&self, key: MeterKey) -> Option<Arc<str>> {
        self.channels
            .iter()
            .find(|c| c.key == key && key.domain == Domain::Gpu)
            .map(|c| c.device_id.clone())
    }

    fn read(&mut self, elapsed_us: u64, out: &mut Vec<DomainReading>) {
        let mut values: Vec<Option<ChannelRead>> = match self.read_all() {
            Ok(v) => v.into_iter().map(Some).collect(),
            Err(why) => {
                if why.contains("gone") && !self.warned_gone {
                    self.warned_gone = true;
                    tracing::warn!(%why, "hwmon sensors are no longer read: every interval is a gap");
                } else {
                    tracing::debug!(%why, "hwmon read");
                }
                self.channels
                    .iter()
                    .map(|c| {
                        Some(Err(HostError::io(
                            &c.path,
                            std::io::Error::new(std::io::ErrorKind::TimedOut, why.clone()),
                            HINT,
                        )))
                    })
                    .collect()
            }
        };
        for (c, raw) in self.channels.iter_mut().zip(values.iter_mut()) {
            let raw = raw.take().unwrap_or_else(|| {
                Err(HostError::NotFound {
                    path: c.path.clone(),
                })
            });
            let (source, quality, sample) = match &mut c.reading {
                Reading::Energy(counter) => {
                    let sample = raw.and_then(|(raw, relocated)| {
                        // A device found again counts from a new baseline: this interval is a
                        // gap, never a difference across two devices' counts.
                        if relocated {
                            counter.invalidate();
                        }
                        counter
                            .update(raw, elapsed_us)
                            .map_err(|e| HostError::malformed(&c.path, e.to_string()))
                    });
                    if sample.is_err() {
                        counter.invalidate();
                    }
                    (SourceKind::Hwmon, Quality::Measured, sample)
                }
                Reading::Power(p, clock) => {
                    *clock = clock.saturating_add(elapsed_us);
                    let sample = match raw {
                        Ok((uw, relocated)) => {
                            if relocated {
                                p.invalidate();
                            }
                            p.add_uw(*clock, uw);
                            Ok(p.close(elapsed_us))
                        }
                        Err(e) => {
                            p.invalidate();
                            Err(e)
                        }
                    };
                    (SourceKind::HwmonPower, Quality::Estimated, sample)
                }
            };
            out.push(DomainReading {
                key: c.key,
                source,
                quality,
                sample,
            });
        }
    }
}
