//! The bpf(2) system call, as much of it as the cgroup trace uses: hash and array maps, loading a
//! raw-tracepoint program and attaching it, and a small assembler for the program text. By hand
//! because the kept Rust BPF libraries load programs from ELF objects built by a BPF compiler
//! toolchain (clang or bpf-linker), which neither this build nor a host has; the two programs are
//! some sixty instructions, assembled at start from the offsets the running kernel's BTF gives.
//! `union bpf_attr` is written field by field at the offsets of `include/uapi/linux/bpf.h`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const BPF_MAP_CREATE: u32 = 0;
const BPF_MAP_LOOKUP_ELEM: u32 = 1;
const BPF_MAP_UPDATE_ELEM: u32 = 2;
const BPF_MAP_DELETE_ELEM: u32 = 3;
const BPF_MAP_GET_NEXT_KEY: u32 = 4;
const BPF_PROG_LOAD: u32 = 5;
const BPF_RAW_TRACEPOINT_OPEN: u32 = 17;

pub const MAP_HASH: u32 = 1;
pub const MAP_ARRAY: u32 = 2;
/// `BPF_F_NO_PREALLOC`: a hash map takes kernel memory as entries come, not all at creation.
pub const NO_PREALLOC: u32 = 1;
/// `BPF_NOEXIST`: an update that must create the entry.
pub const NOEXIST: u64 = 1;
pub const PROG_RAW_TRACEPOINT: u32 = 17;

/// Helper function ids (`enum bpf_func_id`).
pub mod helper {
    pub const MAP_LOOKUP_ELEM: i32 = 1;
    pub const MAP_UPDATE_ELEM: i32 = 2;
    pub const MAP_DELETE_ELEM: i32 = 3;
    pub const PROBE_READ_KERNEL: i32 = 113;
    pub const PROBE_READ_KERNEL_STR: i32 = 115;
}

/// A `union bpf_attr` being written: zeroed, then its fields at their offsets.
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn u32(mut self, at: usize, v: u32) -> Self {
        self.0[at..at + 4].copy_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, at: usize, v: u64) -> Self {
        self.0[at..at + 8].copy_from_slice(&v.to_le_bytes());
        self
    }
    fn name(mut self, at: usize, name: &str) -> Self {
        let n = name.len().min(15);
        self.0[at..at + n].copy_from_slice(&name.as_bytes()[..n]);
        self
    }
    /// Runs `cmd` with the first `len` bytes as the attribute.
    fn call(mut self, cmd: u32, len: usize) -> io::Result<i32> {
        let len = len.min(self.0.len());
        // SAFETY: the attribute is a live, writable buffer of at least `len` bytes laid out as
        // the kernel's `union bpf_attr` for `cmd`; every address written into it points into a
        // buffer the caller borrows for the whole call, of the size given beside it.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                libc::c_long::from(cmd as i32),
                self.0.as_mut_ptr(),
                len as libc::c_uint,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        i32::try_from(rc).map_err(|_| io::Error::other("bpf(2) returned out of range"))
    }
    fn call_fd(self, cmd: u32, len: usize) -> io::Result<OwnedFd> {
        let fd = self.call(cmd, len)?;
        // SAFETY: these commands return a new file descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

fn addr(b: &[u8]) -> u64 {
    b.as_ptr() as u64
}

/// A BPF map, with the sizes its keys and values must have.
#[derive(Debug)]
pub struct Map {
    fd: OwnedFd,
    key_size: usize,
    value_size: usize,
}

fn wrong_size(what: &str, got: usize, want: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("bpf map {what} of {got} bytes, the map's is {want}"),
    )
}

impl Map {
    pub fn create(
        kind: u32,
        key_size: usize,
        value_size: usize,
        max_entries: u32,
        flags: u32,
        name: &str,
    ) -> io::Result<Map> {
        let fd = Attr::new()
            .u32(0, kind)
            .u32(4, key_size as u32)
            .u32(8, value_size as u32)
            .u32(12, max_entries)
            .u32(16, flags)
            .name(28, name)
            .call_fd(BPF_MAP_CREATE, 44)?;
        Ok(Map {
            fd,
            key_size,
            value_size,
        })
    }

    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    fn check(&self, key: &[u8], value: Option<&[u8]>) -> io::Result<()> {
        if key.len() != self.key_size {
            return Err(wrong_size("key", key.len(), self.key_size));
        }
        match value {
            Some(v) if v.len() != self.value_size => {
                Err(wrong_size("value", v.len(), self.value_size))
            }
            _ => Ok(()),
        }
    }

    fn elem(&self, cmd: u32, key: &[u8], value: u64, flags: u64) -> io::Result<i32> {
        Attr::new()
            .u32(0, self.fd.as_raw_fd() as u32)
            .u64(8, addr(key))
            .u64(16, value)
            .u64(24, flags)
            .call(cmd, 32)
    }

    /// The value of `key` into `value`; false when there is no such entry.
    pub fn lookup(&self, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
        self.check(key, Some(value))?;
        match self.elem(BPF_MAP_LOOKUP_ELEM, key, value.as_mut_ptr() as u64, 0) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn update(&self, key: &[u8], value: &[u8], flags: u64) -> io::Result<()> {
        self.check(key, Some(value))?;
        self.elem(BPF_MAP_UPDATE_ELEM, key, addr(value), flags)
            .map(|_| ())
    }

    /// Deletes `key`; false when there was no such entry.
    pub fn delete(&self, key: &[u8]) -> io::Result<bool> {
        self.check(key, None)?;
        match self.elem(BPF_MAP_DELETE_ELEM, key, 0, 0) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every key, in the map's order (a walk with [`Self::next_key`]; entries added or deleted
    /// meanwhile may be missed or seen).
    pub fn keys(&self) -> io::Result<Vec<Vec<u8>>> {
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let mut next = vec![0u8; self.key_size];
        while self.next_key(keys.last().map(Vec::as_slice), &mut next)? {
            keys.push(next.clone());
        }
        Ok(keys)
    }

    /// The key after `key` (the first with `None`) into `next`; false at the end.
    pub fn next_key(&self, key: Option<&[u8]>, next: &mut [u8]) -> io::Result<bool> {
        if next.len() != self.key_size {
            return Err(wrong_size("key", next.len(), self.key_size));
        }
        if let Some(k) = key {
            self.check(k, None)?;
        }
        let key_addr = key.map_or(0, addr);
        let attr = Attr::new()
            .u32(0, self.fd.as_raw_fd() as u32)
            .u64(8, key_addr)
            .u64(16, next.as_mut_ptr() as u64);
        match attr.call(BPF_MAP_GET_NEXT_KEY, 24) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// A program the verifier refused (its log's tail), or a load that failed for another reason.
#[derive(Debug)]
pub struct LoadError {
    pub error: io::Error,
    pub log: String,
}

/// How many times a load the verifier abandoned for a pending signal is tried.
pub const LOAD_TRIES: u32 = 10;

/// Loads a raw-tracepoint program. The licence must be GPL-compatible for the kernel to grant
/// the probe-read helpers. The verifier gives up with EAGAIN when a signal is pending for the
/// loading thread (`bpf(2)`); that load is tried again, up to [`LOAD_TRIES`] times, as libbpf
/// does: a signal at start-up must not cost the daemon its exact usage source for its lifetime.
/// On a refusal the load is tried again with the verifier's log.
pub fn load_raw_tracepoint(insns: &[Insn], name: &str) -> Result<OwnedFd, LoadError> {
    load_raw_tracepoint_tries(insns, name, LOAD_TRIES).map(|(fd, _)| fd)
}

/// [`load_raw_tracepoint`] with at most `tries` loads (at least one); gives the program and how
/// many loads the verifier abandoned for a signal on the way.
pub fn load_raw_tracepoint_tries(
    insns: &[Insn],
    name: &str,
    tries: u32,
) -> Result<(OwnedFd, u32), LoadError> {
    let text: Vec<u8> = insns.iter().flat_map(|i| i.encode()).collect();
    let license = b"Dual MIT/GPL\0";
    let attempt = |log: Option<&mut [u8]>| {
        let (level, size, buf) = match log {
            Some(l) => (1, l.len() as u32, l.as_mut_ptr() as u64),
            None => (0, 0, 0),
        };
        Attr::new()
            .u32(0, PROG_RAW_TRACEPOINT)
            .u32(4, insns.len() as u32)
            .u64(8, addr(&text))
            .u64(16, addr(license))
            .u32(24, level)
            .u32(28, size)
            .u64(32, buf)
            .name(48, name)
            .call_fd(BPF_PROG_LOAD, 72)
    };
    let mut interrupted = 0;
    let error = loop {
        match attempt(None) {
            Ok(fd) => return Ok((fd, interrupted)),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && interrupted + 1 < tries.max(1) => {
                interrupted += 1;
            }
            Err(e) => break e,
        }
    };
    let mut log = vec![0u8; 1 << 16];
    let _ = attempt(Some(&mut log));
    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
    let text = String::from_utf8_lossy(&log[..end]);
    let tail: Vec<&str> = text.lines().rev().take(12).collect();
    let mut log = tail.into_iter().rev().collect::<Vec<_>>().join(" | ");
    if error.raw_os_error() == Some(libc::EAGAIN) {
        log = format!("a signal was pending in each of {tries} loads; last log: {log}");
    }
    Err(LoadError { error, log })
}

/// Attaches `prog` to the raw tracepoint `name`; the program stays attached while the returned
/// descriptor is open.
pub fn attach_raw_tracepoint(name: &str, prog: &OwnedFd) -> io::Result<OwnedFd> {
    let mut c = name.as_bytes().to_vec();
    c.push(0);
    Attr::new()
        .u64(0, addr(&c))
        .u32(8, prog.as_raw_fd() as u32)
        .call_fd(BPF_RAW_TRACEPOINT_OPEN, 16)
}

/// One instruction (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    code: u8,
    dst: u8,
    src: u8,
    off: i16,
    imm: i32,
}

impl Insn {
    fn encode(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0] = self.code;
        b[1] = (self.src << 4) | (self.dst & 0x0f);
        b[2..4].copy_from_slice(&self.off.to_le_bytes());
        b[4..8].copy_from_slice(&self.imm.to_le_bytes());
        b
    }
}

/// Registers: r0 return value, r1-r5 arguments (clobbered by calls), r6-r9 kept across calls,
/// r10 the read-only frame pointer.
pub type Reg = u8;
pub const R0: Reg = 0;
pub const R1: Reg = 1;
pub const R2: Reg = 2;
pub const R3: Reg = 3;
pub const R4: Reg = 4;
pub const R6: Reg = 6;
pub const R7: Reg = 7;
pub const R8: Reg = 8;
pub const FP: Reg = 10;

/// A jump target, bound to an instruction with [`Asm::bind`].
#[derive(Debug, Clone, Copy)]
pub struct Label(usize);

/// Builds a program: instructions, and jumps to labels resolved at [`Asm::finish`].
#[derive(Debug, Default)]
pub struct Asm {
    insns: Vec<Insn>,
    labels: Vec<Option<usize>>,
    jumps: Vec<(usize, Label)>,
}

impl Asm {
    fn op(&mut self, code: u8, dst: Reg, src: Reg, off: i16, imm: i32) -> &mut Self {
        self.insns.push(Insn {
            code,
            dst,
            src,
            off,
            imm,
        });
        self
    }
    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }
    pub fn bind(&mut self, l: Label) -> &mut Self {
        self.labels[l.0] = Some(self.insns.len());
        self
    }
    /// `dst = *(u64 *)(src + off)`
    pub fn load64(&mut self, dst: Reg, src: Reg, off: i16) -> &mut Self {
        self.op(0x79, dst, src, off, 0)
    }
    /// `dst = *(u32 *)(src + off)`
    pub fn load32(&mut self, dst: Reg, src: Reg, off: i16) -> &mut Self {
        self.op(0x61, dst, src, off, 0)
    }
    /// `*(u32 *)(dst + off) = src`
    pub fn store32(&mut self, dst: Reg, off: i16, src: Reg) -> &mut Self {
        self.op(0x63, dst, src, off, 0)
    }
    /// `*(u64 *)(dst + off) = src`
    pub fn store64(&mut self, dst: Reg, off: i16, src: Reg) -> &mut Self {
        self.op(0x7b, dst, src, off, 0)
    }
    /// `*(u64 *)(dst + off) = imm`
    pub fn store64_imm(&mut self, dst: Reg, off: i16, imm: i32) -> &mut Self {
        self.op(0x7a, dst, 0, off, imm)
    }
    /// `*(u32 *)(dst + off) = imm`
    pub fn store32_imm(&mut self, dst: Reg, off: i16, imm: i32) -> &mut Self {
        self.op(0x62, dst, 0, off, imm)
    }
    /// `lock *(u64 *)(dst + off) += src`
    pub fn atomic_add64(&mut self, dst: Reg, off: i16, src: Reg) -> &mut Self {
        self.op(0xdb, dst, src, off, 0)
    }
    pub fn mov(&mut self, dst: Reg, src: Reg) -> &mut Self {
        self.op(0xbf, dst, src, 0, 0)
    }
    pub fn mov_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.op(0xb7, dst, 0, 0, imm)
    }
    pub fn add_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.op(0x07, dst, 0, 0, imm)
    }
    /// `dst = &fp[off]`: a pointer into the stack.
    pub fn stack_ptr(&mut self, dst: Reg, off: i16) -> &mut Self {
        self.mov(dst, FP).add_imm(dst, i32::from(off))
    }
    /// `dst = map` (a 64-bit load of the map's descriptor, which the kernel replaces).
    pub fn load_map(&mut self, dst: Reg, map: &Map) -> &mut Self {
        self.op(0x18, dst, 1, 0, map.raw_fd()).op(0, 0, 0, 0, 0)
    }
    pub fn call(&mut self, helper: i32) -> &mut Self {
        self.op(0x85, 0, 0, 0, helper)
    }
    pub fn exit(&mut self) -> &mut Self {
        self.op(0x95, 0, 0, 0, 0)
    }
    fn jump(&mut self, code: u8, dst: Reg, imm: i32, to: Label) -> &mut Self {
        self.jumps.push((self.insns.len(), to));
        self.op(code, dst, 0, 0, imm)
    }
    pub fn jeq_imm(&mut self, dst: Reg, imm: i32, to: Label) -> &mut Self {
        self.jump(0x15, dst, imm, to)
    }
    pub fn jne_imm(&mut self, dst: Reg, imm: i32, to: Label) -> &mut Self {
        self.jump(0x55, dst, imm, to)
    }
    /// Jump when `dst < imm`, signed.
    pub fn jslt_imm(&mut self, dst: Reg, imm: i32, to: Label) -> &mut Self {
        self.jump(0xc5, dst, imm, to)
    }
    /// Jump when `dst >= imm`, signed.
    pub fn jsge_imm(&mut self, dst: Reg, imm: i32, to: Label) -> &mut Self {
        self.jump(0x75, dst, imm, to)
    }
    pub fn ja(&mut self, to: Label) -> &mut Self {
        self.jump(0x05, 0, 0, to)
    }

    /// The instructions, every jump resolved; an unbound label is a bug in the program text.
    pub fn finish(mut self) -> Result<Vec<Insn>, String> {
        for &(at, label) in &self.jumps {
            let target =
                self.labels[label.0].ok_or_else(|| format!("label {} unbound", label.0))?;
            let off = target as i64 - at as i64 - 1;
            self.insns[at].off =
                i16::try_from(off).map_err(|_| format!("jump at {at} out of range"))?;
        }
        Ok(self.insns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_encode_as_the_kernel_reads_them() {
        let mut a = Asm::default();
        let out = a.label();
        a.load64(R6, R1, 8)
            .jeq_imm(R6, 0, out)
            .atomic_add64(R0, 0, R6)
            .bind(out)
            .mov_imm(R0, 0)
            .exit();
        let insns = a.finish().expect("labels bound");
        let bytes: Vec<[u8; 8]> = insns.iter().map(|i| i.encode()).collect();
        // r6 = *(u64 *)(r1 + 8)
        assert_eq!(bytes[0], [0x79, 0x16, 8, 0, 0, 0, 0, 0]);
        // if r6 == 0 goto +1 (over the atomic add)
        assert_eq!(bytes[1], [0x15, 0x06, 1, 0, 0, 0, 0, 0]);
        // lock *(u64 *)(r0 + 0) += r6
        assert_eq!(bytes[2], [0xdb, 0x60, 0, 0, 0, 0, 0, 0]);
        assert_eq!(bytes[4], [0x95, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn an_unbound_label_is_refused() {
        let mut a = Asm::default();
        let l = a.label();
        a.ja(l);
        assert!(a.finish().is_err());
    }
}
