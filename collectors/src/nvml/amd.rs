//! AMD GPUs through AMD SMI (`libamd_smi`, ROCm's management library), loaded at run time like
//! NVML: a host without ROCm, without the `amdgpu` driver or without permission still starts,
//! and [`RealAmdSmi::open`] says which.
//!
//! Two AMD SMI calls are used, behind the same [`NvmlApi`] as NVML so that one collector serves
//! both:
//! - **energy**: `amdsmi_get_energy_count`, an accumulator and its resolution in microjoules
//!   (15.2587890625 uJ, exactly 2^-16 J, on current GPUs): read as a counter in that unit
//!   ([`unit_of_resolution`]), never as the float product;
//! - **who used the GPU**: `amdsmi_get_gpu_process_list`, every process with a context on the
//!   GPU and its cumulative time on the graphics/compute engine (`engine_usage.gfx`, ns). The
//!   collector turns differences of that time into each process's share.
//!
//! The process list is an array of `amdsmi_proc_info_t`, a structure whose size changed across
//! releases (224 bytes with 32-byte strings up to library 24.x, 704 bytes with 256-byte strings
//! from 25.x), and whose call changed form (a list of pids plus `amdsmi_get_gpu_process_info`
//! in 23.x and early 24.x releases, the structures themselves by 24.6). Reading it with the wrong size would read
//! garbage or, worse, let the library write past the buffer. So: the buffer handed over holds
//! [`ENTRY_GUARD`] bytes per entry, far above any layout, zeroed before every call, so the
//! library never writes past it; and it is decoded only when the library's version names a
//! layout this file knows ([`proc_layout`]) and the library has no `amdsmi_get_gpu_process_info`
//! (the older form). Any other library's GPUs have their energy measured and recorded
//! unattributed (`NO_USAGE_DATA`), and `wattd probe` says why. Libraries older than 23.2 (the pre-release API, whose status codes and
//! argument order differ) are refused at open: they lack `amdsmi_get_lib_version`.
//!
//! `engine_usage.gfx` is the `drm-engine-gfx` time of the process's DRM clients (the library
//! reads fdinfo): work submitted through KFD compute queues (HIP) may not show in it. Where a
//! listed process shows no engine time in an interval, the attribution weighs every listed
//! process alike. Under MI300 partition modes several processors may share one accumulator:
//! not verified (no AMD GPU was reachable).

use std::ffi::{c_char, c_uint, c_void, OsStr};

use super::{ComputeProcess, EngineTime, GpuVendor, MigInstance, NvmlApi, NvmlError, UtilSample};
use crate::counter::EnergyUnit;

/// The library names tried when none is configured: the loader's path (ROCm's ld.so.conf
/// entry), then ROCm's default prefix.
pub const DEFAULT_LIBRARIES: &[&str] = &["libamd_smi.so", "/opt/rocm/lib/libamd_smi.so"];

/// Bytes of buffer per process-list entry: above every `amdsmi_proc_info_t` so far (704 bytes at
/// most), so a library whose structure is larger than the layout decoded still writes inside the
/// buffer.
pub const ENTRY_GUARD: usize = 4096;

/// Most processes read from one GPU's list.
pub const PROCESSES_MAX: u32 = 4096;

/// Most GPUs (processors) taken from one socket.
const PROCESSORS_MAX: u32 = 64;

/// The accumulator's resolution, microjoules per count, as a counter unit. A power of two of
/// joules (2^-16 J is 15.2587890625 uJ) is exact; another finite positive scale is converted in
/// floating point. Zero, negative, NaN or absurd (a count worth over a joule) is refused.
pub fn unit_of_resolution(resolution_uj: f32) -> Result<EnergyUnit, NvmlError> {
    let r = f64::from(resolution_uj);
    if !r.is_finite() || r <= 0.0 || r > 1e6 {
        return Err(NvmlError::Other(format!(
            "amdsmi_get_energy_count: counter resolution {resolution_uj} uJ is not a usable unit"
        )));
    }
    Ok(match r {
        1.0 => EnergyUnit::MicroJoule,
        1000.0 => EnergyUnit::MilliJoule,
        _ => EnergyUnit::from_joule_scale(r / 1e6),
    })
}

/// Where `pid` and `engine_usage.gfx` sit in one `amdsmi_proc_info_t`, and its size (x86_64 and
/// aarch64 alike: natural alignment, no packing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcLayout {
    pub size: usize,
    pub pid_at: usize,
    pub gfx_at: usize,
}

impl ProcLayout {
    /// The layout for a header whose strings are `name_len` bytes and whose structure ends in
    /// `tail` bytes (4 reserved words, or the 12 words `cu_occupancy` and later fields share).
    /// Fields: `char name[N]; uint32 pid; uint64 mem; struct { uint64 gfx, enc; uint32
    /// reserved[12]; } engine_usage; struct { uint64 gtt, cpu, vram; uint32 reserved[10]; }
    /// memory_usage; char container_name[N]; tail`.
    pub const fn of(name_len: usize, tail: usize) -> Self {
        let mem_at = (name_len + 4).next_multiple_of(8);
        let gfx_at = mem_at + 8;
        let end = gfx_at + 64 + 64 + name_len + tail;
        ProcLayout {
            size: end.next_multiple_of(8),
            pid_at: name_len,
            gfx_at,
        }
    }
}

/// The process-list layout of an AMD SMI library major version (as `amdsmi_get_lib_version`
/// gives it, see [`version_words`]), or `None` when this file does not know it.
pub fn proc_layout(major: u32) -> Option<ProcLayout> {
    match major {
        // 23.2 to 24.7: AMDSMI_NORMAL_STRING_LENGTH (32) strings, four reserved words at the end.
        23 | 24 => Some(ProcLayout::of(32, 16)),
        // 25.x and 26.x: AMDSMI_MAX_STRING_LENGTH (256) strings; a tail of twelve words
        // (reserved, then cu_occupancy, evicted_time, sdma_usage taking some of them).
        25 | 26 => Some(ProcLayout::of(256, 48)),
        _ => None,
    }
}

/// Decodes `n` entries of a process list laid out as `layout` from `buf`. An entry beyond the
/// buffer is an error, never a read past it.
pub fn decode_procs(
    buf: &[u8],
    n: usize,
    layout: ProcLayout,
) -> Result<Vec<EngineTime>, NvmlError> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let at = i * layout.size;
        let entry = buf.get(at..at + layout.size).ok_or_else(|| {
            NvmlError::Other(format!(
                "amdsmi_get_gpu_process_list: entry {i} lies beyond the {} bytes read",
                buf.len()
            ))
        })?;
        let word = |off: usize, len: usize| entry.get(off..off + len);
        let (Some(pid), Some(gfx)) = (word(layout.pid_at, 4), word(layout.gfx_at, 8)) else {
            return Err(NvmlError::Other(
                "amdsmi_proc_info_t layout out of range".into(),
            ));
        };
        let mut p = [0u8; 4];
        p.copy_from_slice(pid);
        let mut g = [0u8; 8];
        g.copy_from_slice(gfx);
        out.push(EngineTime {
            pid: u32::from_ne_bytes(p),
            gfx_ns: u64::from_ne_bytes(g),
        });
    }
    Ok(out)
}

/// `amdsmi_status_t` as wattd distinguishes it (values stable since library 23.1).
fn status(call: &str, code: u32) -> NvmlError {
    match code {
        30 => NvmlError::Other(format!("{call}: the GPU is busy (AMDSMI_STATUS_BUSY)")),
        32 => NvmlError::Other(format!(
            "{call}: AMD SMI is not initialised (AMDSMI_STATUS_NOT_INIT)"
        )),
        2 | 3 => NvmlError::NotSupported,
        31 => NvmlError::NotFound,
        10 => NvmlError::Other(format!(
            "{call}: no permission (AMDSMI_STATUS_NO_PERM): the service needs /dev/kfd and \
             /dev/dri/renderD*"
        )),
        34 => NvmlError::Other(format!(
            "{call}: the amdgpu driver is not loaded (AMDSMI_STATUS_DRIVER_NOT_LOADED)"
        )),
        8 => NvmlError::Timeout,
        1 => NvmlError::InvalidArgument,
        other => NvmlError::Other(format!("{call}: AMD SMI status {other}")),
    }
}

const SUCCESS: u32 = 0;
const NO_PERM: u32 = 10;
const OUT_OF_RESOURCES: u32 = 15;
/// `AMDSMI_INIT_AMD_GPUS`.
const INIT_AMD_GPUS: u64 = 1 << 1;
/// `AMDSMI_PROCESSOR_TYPE_AMD_GPU`.
const PROCESSOR_TYPE_AMD_GPU: u32 = 1;
/// `AMDSMI_GPU_UUID_SIZE`.
const UUID_SIZE: usize = 38;

type Handle = *mut c_void;
type InitFn = unsafe extern "C" fn(u64) -> u32;
type ShutDownFn = unsafe extern "C" fn() -> u32;
type VersionFn = unsafe extern "C" fn(*mut c_void) -> u32;
type SocketsFn = unsafe extern "C" fn(*mut u32, *mut Handle) -> u32;
type ProcessorsFn = unsafe extern "C" fn(Handle, *mut u32, *mut Handle) -> u32;
type TypeFn = unsafe extern "C" fn(Handle, *mut u32) -> u32;
type UuidFn = unsafe extern "C" fn(Handle, *mut c_uint, *mut c_char) -> u32;
type EnergyFn = unsafe extern "C" fn(Handle, *mut u64, *mut f32, *mut u64) -> u32;
type ProcListFn = unsafe extern "C" fn(Handle, *mut u32, *mut c_void) -> u32;

/// The functions used, resolved once.
#[derive(Clone, Copy)]
struct Fns {
    shut_down: ShutDownFn,
    uuid: UuidFn,
    energy: EnergyFn,
}

/// AMD SMI, initialised, with the GPU processor handles it listed at open. Handles are opaque
/// tokens valid until `amdsmi_shut_down`, which `Drop` calls.
pub struct RealAmdSmi {
    fns: Fns,
    gpus: Vec<Handle>,
    /// The process list's function and the layout it is decoded with, or why it is not read.
    list: Result<(ProcListFn, ProcLayout), String>,
    major: u32,
    version: String,
    buf: Vec<u8>,
    /// Never unloaded: the function pointers above point into it, and a C++ library with
    /// threads and static destructors is not safely `dlclose`d while the process runs.
    _lib: std::mem::ManuallyDrop<libloading::Library>,
}

// SAFETY: the handles are opaque tokens the library hands out and never dereferenced here; AMD
// SMI's calls take their own locks, and the collector owns this value and calls it from one
// thread at a time.
unsafe impl Send for RealAmdSmi {}

impl std::fmt::Debug for RealAmdSmi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealAmdSmi")
            .field("gpus", &self.gpus.len())
            .field("version", &self.version)
            .field("layout", &self.list.as_ref().map(|(_, l)| l))
            .finish()
    }
}

fn load<T: Copy>(lib: &libloading::Library, name: &[u8]) -> Result<T, NvmlError> {
    // SAFETY: `T` is the function type the AMD SMI header declares for `name`; the pointer is
    // used only while `lib` is loaded (RealAmdSmi keeps it).
    let sym = unsafe { lib.get::<T>(name) }.map_err(|e| {
        NvmlError::Other(format!(
            "libamd_smi lacks {}: {e}",
            String::from_utf8_lossy(name.strip_suffix(b"\0").unwrap_or(name))
        ))
    })?;
    Ok(*sym)
}

impl RealAmdSmi {
    /// Loads `library` (default: [`DEFAULT_LIBRARIES`] in turn), initialises AMD SMI for AMD
    /// GPUs and lists them.
    pub fn open(library: Option<&OsStr>) -> Result<Self, NvmlError> {
        let names: Vec<&OsStr> = match library {
            Some(l) => vec![l],
            None => DEFAULT_LIBRARIES.iter().map(OsStr::new).collect(),
        };
        let mut why = Vec::new();
        let mut lib = None;
        for n in names {
            // SAFETY: loading runs the library's initialisers; libamd_smi's are ROCm's own,
            // the same a ROCm tool runs.
            match unsafe { libloading::Library::new(n) } {
                Ok(l) => {
                    lib = Some(l);
                    break;
                }
                Err(e) => why.push(e.to_string()),
            }
        }
        let lib = lib.ok_or_else(|| NvmlError::LibraryNotFound(why.join("; ")))?;
        let init: InitFn = load(&lib, b"amdsmi_init\0")?;
        // Absent before library 23.2, whose API (argument order, status codes) differs.
        let version_fn: VersionFn = load(&lib, b"amdsmi_get_lib_version\0").map_err(|e| {
            NvmlError::Other(format!(
                "{e}: an AMD SMI older than 23.2 (ROCm 6.0) is not used"
            ))
        })?;
        let pid_list_form = load::<VersionFn>(&lib, b"amdsmi_get_gpu_process_info\0").is_ok();
        let sockets: SocketsFn = load(&lib, b"amdsmi_get_socket_handles\0")?;
        let processors: ProcessorsFn = load(&lib, b"amdsmi_get_processor_handles\0")?;
        let ptype: TypeFn = load(&lib, b"amdsmi_get_processor_type\0")?;
        let fns = Fns {
            shut_down: load(&lib, b"amdsmi_shut_down\0")?,
            uuid: load(&lib, b"amdsmi_get_gpu_device_uuid\0")?,
            energy: load(&lib, b"amdsmi_get_energy_count\0")?,
        };
        let proc_list: Option<ProcListFn> = load(&lib, b"amdsmi_get_gpu_process_list\0").ok();
        // SAFETY: amdsmi_init(uint64_t flags).
        let rc = unsafe { init(INIT_AMD_GPUS) };
        if rc != SUCCESS {
            return Err(status("amdsmi_init", rc));
        }
        let (version, major, layout) = read_version(version_fn);
        let list = match (proc_list, layout) {
            (None, _) => Err("it has no amdsmi_get_gpu_process_list".to_owned()),
            (Some(_), _) if pid_list_form => {
                Err("its process list is the older list of pids".to_owned())
            }
            (Some(_), None) => {
                Err("its amdsmi_proc_info_t layout is not known to this wattd".to_owned())
            }
            (Some(f), Some(l)) => Ok((f, l)),
        };
        let mut me = RealAmdSmi {
            fns,
            gpus: Vec::new(),
            list,
            major,
            version,
            buf: Vec::new(),
            _lib: std::mem::ManuallyDrop::new(lib),
        };
        me.gpus = list_gpus(sockets, processors, ptype)?;
        Ok(me)
    }

    /// The library's version, as it said it.
    pub fn version(&self) -> &str {
        &self.version
    }

    fn handle(&self, gpu: u32) -> Result<Handle, NvmlError> {
        self.gpus
            .get(gpu as usize)
            .copied()
            .ok_or(NvmlError::InvalidArgument)
    }
}

/// `amdsmi_get_lib_version` (after `amdsmi_init`: up to 24.x it answers NOT_INIT before): the
/// version as text, its major and the process-list layout it names. The structure changed (a
/// `year` field came and went), so it is read into a zeroed buffer larger than every form and
/// only its leading 32-bit words are looked at.
fn read_version(f: VersionFn) -> (String, u32, Option<ProcLayout>) {
    /// Aligned for the `build` pointer the library stores in it.
    #[repr(C, align(8))]
    struct Words([u32; 16]);
    let mut buf = Words([0; 16]);
    // SAFETY: the buffer (64 bytes, 8-aligned) is larger than every amdsmi_version_t (24 bytes,
    // 40 for the pre-23.2 amdsmi_version_t); the `build` string pointer in it is not read.
    let rc = unsafe { f(buf.0.as_mut_ptr().cast()) };
    let words = buf.0;
    if rc != SUCCESS {
        return (
            format!("unknown (amdsmi_get_lib_version: status {rc})"),
            0,
            None,
        );
    }
    version_words(words[0], words[1], words[2], words[3])
}

/// The version from the structure's first four words: `{year, major, minor, release}` up to
/// 25.x (the year two digits, 23 to 25), `{major, minor, release}` from 26.x (the year removed).
pub fn version_words(w0: u32, w1: u32, w2: u32, w3: u32) -> (String, u32, Option<ProcLayout>) {
    let (major, minor, release) = if w0 >= 26 { (w0, w1, w2) } else { (w1, w2, w3) };
    (
        format!("{major}.{minor}.{release}"),
        major,
        proc_layout(major),
    )
}

/// Asks a handle-listing call for its count (a null array), then for that many handles (at
/// most [`PROCESSORS_MAX`]), as every AMD SMI listing call is made. `f` gets the count in and
/// out and the array, null or holding the count's handles.
fn handles(
    call: &str,
    mut f: impl FnMut(&mut u32, *mut Handle) -> u32,
) -> Result<Vec<Handle>, NvmlError> {
    let mut n: u32 = 0;
    let rc = f(&mut n, std::ptr::null_mut());
    if rc != SUCCESS {
        return Err(status(call, rc));
    }
    let n = n.min(PROCESSORS_MAX);
    let mut out: Vec<Handle> = vec![std::ptr::null_mut(); n as usize];
    let mut got = n;
    let rc = f(&mut got, out.as_mut_ptr());
    if rc != SUCCESS {
        return Err(status(call, rc));
    }
    out.truncate(got.min(n) as usize);
    Ok(out)
}

fn list_gpus(
    sockets: SocketsFn,
    processors: ProcessorsFn,
    ptype: TypeFn,
) -> Result<Vec<Handle>, NvmlError> {
    // SAFETY: `handles` passes a null array (the count only) or one holding `*n` handles.
    let socks = handles("amdsmi_get_socket_handles", |n, h| unsafe { sockets(n, h) })?;
    let mut gpus = Vec::new();
    for s in socks {
        // SAFETY: `s` is a socket the library listed; the array as above.
        let procs = handles("amdsmi_get_processor_handles", |n, h| unsafe {
            processors(s, n, h)
        })?;
        for p in procs {
            let mut t: u32 = u32::MAX;
            // SAFETY: `p` is a handle the library listed; `t` is a valid out-pointer.
            let rc = unsafe { ptype(p, &mut t) };
            if rc == SUCCESS && t == PROCESSOR_TYPE_AMD_GPU && gpus.len() < PROCESSORS_MAX as usize
            {
                gpus.push(p);
            }
        }
    }
    Ok(gpus)
}

impl Drop for RealAmdSmi {
    fn drop(&mut self) {
        // SAFETY: amdsmi_shut_down(void), once, after every handle's last use.
        let _ = unsafe { (self.fns.shut_down)() };
    }
}

impl NvmlApi for RealAmdSmi {
    fn vendor(&self) -> GpuVendor {
        GpuVendor::Amd
    }

    fn clock_us(&mut self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    }

    fn device_count(&mut self) -> Result<u32, NvmlError> {
        Ok(self.gpus.len() as u32)
    }

    fn uuid(&mut self, gpu: u32) -> Result<String, NvmlError> {
        let h = self.handle(gpu)?;
        let mut buf = [0u8; UUID_SIZE + 26];
        let mut len: c_uint = buf.len() as c_uint;
        // SAFETY: `buf` holds `len` bytes; the library writes at most `len` and a NUL.
        let rc = unsafe { (self.fns.uuid)(h, &mut len, buf.as_mut_ptr().cast()) };
        if rc != SUCCESS {
            return Err(status("amdsmi_get_gpu_device_uuid", rc));
        }
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        let text = std::str::from_utf8(&buf[..end])
            .ok()
            .filter(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_graphic()))
            .ok_or_else(|| {
                NvmlError::Other("amdsmi_get_gpu_device_uuid: not a printable UUID".into())
            })?;
        Ok(format!("AMD-{text}"))
    }

    fn name(&mut self, _gpu: u32) -> Result<String, NvmlError> {
        // The marketing name sits in a structure whose layout changed too; not needed to bill.
        Err(NvmlError::NotSupported)
    }

    fn energy_count(&mut self, gpu: u32) -> Result<(u64, EnergyUnit), NvmlError> {
        let h = self.handle(gpu)?;
        let (mut acc, mut res, mut ts) = (0u64, 0f32, 0u64);
        // SAFETY: three valid out-pointers, as declared.
        let rc = unsafe { (self.fns.energy)(h, &mut acc, &mut res, &mut ts) };
        if rc != SUCCESS {
            return Err(status("amdsmi_get_energy_count", rc));
        }
        Ok((acc, unit_of_resolution(res)?))
    }

    fn power_mw(&mut self, _gpu: u32) -> Result<u32, NvmlError> {
        Err(NvmlError::NotSupported)
    }

    fn process_utilization(
        &mut self,
        _gpu: u32,
        _since_us: u64,
    ) -> Result<Vec<UtilSample>, NvmlError> {
        Err(NvmlError::NotSupported)
    }

    fn compute_processes(&mut self, _gpu: u32) -> Result<Vec<ComputeProcess>, NvmlError> {
        Err(NvmlError::NotSupported)
    }

    fn mig_enabled(&mut self, _gpu: u32) -> Result<bool, NvmlError> {
        Err(NvmlError::NotSupported)
    }

    fn mig_instances(&mut self, _gpu: u32) -> Result<Vec<MigInstance>, NvmlError> {
        Err(NvmlError::NotSupported)
    }

    fn engine_time_ns(&mut self, gpu: u32) -> Result<Vec<EngineTime>, NvmlError> {
        let (list, layout) = match &self.list {
            Ok(l) => *l,
            Err(why) => {
                return Err(NvmlError::Other(format!(
                    "the process list of AMD SMI {} is not read ({why}): energy is measured and \
                     recorded unattributed",
                    self.version
                )))
            }
        };
        let h = self.handle(gpu)?;
        let mut cap: u32 = 64;
        loop {
            let need = cap as usize * ENTRY_GUARD;
            self.buf.clear();
            self.buf.resize(need, 0);
            let mut n = cap;
            // SAFETY: the buffer holds `cap` entries of ENTRY_GUARD bytes, more than any
            // amdsmi_proc_info_t; the library writes at most `cap` entries.
            let rc = unsafe { list(h, &mut n, self.buf.as_mut_ptr().cast()) };
            match rc {
                // More processes than the buffer held (the list grew between the library's count
                // and its fill, or it said SUCCESS anyway): asked again with room for them.
                SUCCESS | NO_PERM | OUT_OF_RESOURCES if n > cap && cap < PROCESSES_MAX => {
                    cap = n.clamp(cap * 2, PROCESSES_MAX);
                }
                // Up to 24.x the list is filled and NO_PERM returned when a process's name
                // could not be read (another user's); the entries are still right.
                SUCCESS | NO_PERM if rc == SUCCESS || self.major <= 24 => {
                    let n = n.min(cap) as usize;
                    return decode_procs(&self.buf[..n * layout.size], n, layout);
                }
                other => return Err(status("amdsmi_get_gpu_process_list", other)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution_is_an_exact_unit_and_garbage_is_refused() {
        // 15.2587890625 uJ is 2^-16 J: a count of 65,536 is exactly one joule.
        let u = unit_of_resolution(15.258_789).unwrap();
        assert_eq!(u, EnergyUnit::PowTwoJoule(16));
        assert_eq!(u.total_uj(65_536), 1_000_000);
        assert_eq!(u.total_uj(3), 45);
        assert_eq!(unit_of_resolution(1.0).unwrap(), EnergyUnit::MicroJoule);
        assert_eq!(unit_of_resolution(1000.0).unwrap(), EnergyUnit::MilliJoule);
        assert_eq!(unit_of_resolution(15.3).unwrap().total_uj(10), 153);
        for bad in [0.0, -15.3, f32::NAN, f32::INFINITY, 2e6] {
            let e = unit_of_resolution(bad).unwrap_err().to_string();
            assert!(e.contains("resolution"), "{bad}: {e}");
        }
    }

    #[test]
    fn layouts_match_the_headers_sizes() {
        // sizeof(amdsmi_proc_info_t) as the three headers declare it.
        assert_eq!(
            ProcLayout::of(32, 16),
            ProcLayout {
                size: 224,
                pid_at: 32,
                gfx_at: 48
            }
        );
        assert_eq!(
            ProcLayout::of(64, 48),
            ProcLayout {
                size: 320,
                pid_at: 64,
                gfx_at: 80
            }
        );
        assert_eq!(
            ProcLayout::of(256, 48),
            ProcLayout {
                size: 704,
                pid_at: 256,
                gfx_at: 272
            }
        );
        assert!(ProcLayout::of(256, 48).size <= ENTRY_GUARD);
        assert_eq!(proc_layout(99), None);
        assert_eq!(proc_layout(22), None);
    }

    #[test]
    fn the_version_is_read_with_and_without_its_year() {
        // 24.7.1 ({year 24, major 24, minor 7, release 1}): 32-byte strings.
        assert_eq!(
            version_words(24, 24, 7, 1),
            ("24.7.1".to_owned(), 24, Some(ProcLayout::of(32, 16)))
        );
        // 25.4.0 with its year.
        assert_eq!(
            version_words(25, 25, 4, 0),
            ("25.4.0".to_owned(), 25, Some(ProcLayout::of(256, 48)))
        );
        // 26.1.2: {major, minor, release}, no year.
        assert_eq!(
            version_words(26, 1, 2, 0),
            ("26.1.2".to_owned(), 26, Some(ProcLayout::of(256, 48)))
        );
        // A future major: not decoded.
        assert_eq!(version_words(27, 0, 0, 0).2, None);
    }

    /// A list laid out as the library writes it (entries back to back, names first) decodes to
    /// each pid and its engine time; a count beyond the bytes is an error, not a read past them.
    #[test]
    fn process_entries_decode_at_their_offsets() {
        for layout in [
            ProcLayout::of(32, 16),
            ProcLayout::of(64, 48),
            ProcLayout::of(256, 48),
        ] {
            let mut buf = vec![0xAAu8; 3 * layout.size];
            for (i, (pid, gfx)) in [(4242u32, 123_456_789u64), (7, 0), (99, u64::MAX)]
                .iter()
                .enumerate()
            {
                let at = i * layout.size;
                buf[at..at + 4].copy_from_slice(b"job\0");
                buf[at + layout.pid_at..at + layout.pid_at + 4].copy_from_slice(&pid.to_ne_bytes());
                buf[at + layout.gfx_at..at + layout.gfx_at + 8].copy_from_slice(&gfx.to_ne_bytes());
            }
            let got = decode_procs(&buf, 3, layout).unwrap();
            assert_eq!(
                got,
                vec![
                    EngineTime {
                        pid: 4242,
                        gfx_ns: 123_456_789
                    },
                    EngineTime { pid: 7, gfx_ns: 0 },
                    EngineTime {
                        pid: 99,
                        gfx_ns: u64::MAX
                    },
                ]
            );
            let e = decode_procs(&buf, 4, layout).unwrap_err().to_string();
            assert!(e.contains("entry 3"), "{e}");
        }
    }

    #[test]
    fn a_missing_library_is_a_typed_reason() {
        match RealAmdSmi::open(Some(OsStr::new("/nonexistent/libamd_smi.so"))) {
            Err(NvmlError::LibraryNotFound(why)) => assert!(!why.is_empty()),
            other => panic!("expected LibraryNotFound, got {other:?}"),
        }
    }
}
