//! The few facts the cgroup trace needs from the running kernel's BTF (`/sys/kernel/btf/vmlinux`):
//! where a member lies in a kernel struct, and the parameters of a tracepoint. Parsed by hand
//! (the format is a header, a type section and a string table; see the kernel's
//! `Documentation/bpf/btf.rst`): the one crate for it is LGPL, and the agent needs a dozen
//! lookups, no more. The file is host input: every offset is bounds-checked, and what does not
//! parse is an error naming the file.

use std::fmt;

const MAGIC: u16 = 0xeb9f;
/// Struct members looked at for one lookup, at most (the kernel's largest structs have a few
/// hundred, with their anonymous unions).
const MEMBERS_LOOKED_AT_MAX: u32 = 100_000;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// A BTF blob that could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BtfError(pub String);

impl fmt::Display for BtfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn err(what: impl Into<String>) -> BtfError {
    BtfError(what.into())
}

#[derive(Debug, Clone, Copy)]
struct Type {
    name_off: u32,
    kind: u32,
    vlen: u32,
    kind_flag: bool,
    /// Size (int, struct, union, enum) or the referenced type (pointer, typedef, modifiers).
    size_or_type: u32,
    /// Where the kind's trailing records start, in the type section.
    extra: usize,
}

/// Where the blob is: in memory (tests), or the kernel's file, read where needed (`pread`).
enum Data {
    Mem(Vec<u8>),
    File { file: std::fs::File, len: usize },
}

impl Data {
    fn len(&self) -> usize {
        match self {
            Data::Mem(v) => v.len(),
            Data::File { len, .. } => *len,
        }
    }

    /// Fills `buf` from `at`; `None` when that runs past the end or the read fails.
    fn read_at(&self, at: usize, buf: &mut [u8]) -> Option<()> {
        let end = at.checked_add(buf.len())?;
        if end > self.len() {
            return None;
        }
        match self {
            Data::Mem(v) => {
                buf.copy_from_slice(v.get(at..end)?);
                Some(())
            }
            Data::File { file, .. } => {
                use std::os::unix::fs::FileExt as _;
                file.read_exact_at(buf, at as u64).ok()
            }
        }
    }

    fn u32_at(&self, at: usize) -> Option<u32> {
        let mut b = [0u8; 4];
        self.read_at(at, &mut b)?;
        Some(u32::from_le_bytes(b))
    }
}

/// Sequential reads of a section through a 64 KiB window (one `pread` per window).
struct Window<'a> {
    data: &'a Data,
    end: usize,
    buf: Vec<u8>,
    buf_at: usize,
}

impl<'a> Window<'a> {
    fn new(data: &'a Data, end: usize) -> Self {
        Window {
            data,
            end,
            buf: Vec::new(),
            buf_at: 0,
        }
    }

    /// The bytes `at..at + n` (n at most the window), read ahead when they are not in it.
    fn get(&mut self, at: usize, n: usize) -> Option<&[u8]> {
        let end = at.checked_add(n)?;
        if end > self.end {
            return None;
        }
        if at < self.buf_at || end > self.buf_at + self.buf.len() {
            let len = WINDOW_BYTES.max(n).min(self.end - at);
            self.buf.resize(len, 0);
            if self.data.read_at(at, &mut self.buf).is_none() {
                // Nothing stale may pass for this window's bytes.
                self.buf.clear();
                return None;
            }
            self.buf_at = at;
        }
        self.buf.get(at - self.buf_at..end - self.buf_at)
    }
}

const WINDOW_BYTES: usize = 64 * 1024;

/// The `i`th little-endian 32-bit word of `b` (every caller's buffer holds it).
fn le32(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
}

/// A named struct, union or typedef, as the scan found it.
#[derive(Clone, Copy)]
struct Named {
    id: u32,
    kind: u32,
    name_off: u32,
}

/// The parsed type section: where each type's record starts, by id (id 0 is void and has no
/// entry), and the named structs, unions and typedefs with their names' offsets. Records and
/// strings are read when looked at: the kernel's BTF is 5.4 MB (some 150,000 types), read at
/// start for a dozen lookups, and held whole it raised the agent's peak memory by as much.
pub struct Btf {
    data: Data,
    strings_at: usize,
    strings_len: usize,
    types: Vec<u32>,
    named: Vec<Named>,
    /// Where names looked for start in the string section (see [`Self::prepare`]).
    found: std::cell::RefCell<std::collections::HashMap<String, Vec<u32>>>,
}

impl fmt::Debug for Btf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Btf")
            .field("types", &self.types.len())
            .finish()
    }
}

impl Btf {
    /// A blob in memory.
    pub fn parse(data: Vec<u8>) -> Result<Btf, BtfError> {
        Self::scan(Data::Mem(data))
    }

    /// The file at `path` (the kernel's `/sys/kernel/btf/vmlinux`), read where needed, a
    /// window at a time.
    pub fn open(path: &std::path::Path) -> Result<Btf, BtfError> {
        let shown = path.display();
        let file = std::fs::File::open(path).map_err(|e| err(format!("{shown}: {e}")))?;
        let len = file
            .metadata()
            .map_err(|e| err(format!("{shown}: {e}")))
            .and_then(|m| {
                usize::try_from(m.len()).map_err(|_| err(format!("{shown}: too large")))
            })?;
        Self::scan(Data::File { file, len }).map_err(|e| err(format!("{shown}: {e}")))
    }

    fn scan(data: Data) -> Result<Btf, BtfError> {
        let mut header = [0u8; 24];
        if data.len() < 8 || data.read_at(0, &mut header[..8]).is_none() {
            return Err(err("shorter than its header"));
        }
        let magic = u16::from_le_bytes([header[0], header[1]]);
        if magic != MAGIC {
            return Err(err(format!(
                "magic {magic:#06x}, not {MAGIC:#06x} (big-endian or not BTF)"
            )));
        }
        data.read_at(0, &mut header)
            .ok_or_else(|| err("shorter than its header"))?;
        let field = |at: usize| le32(&header, at / 4) as usize;
        let hdr_len = field(4);
        if hdr_len < 24 {
            return Err(err(format!(
                "header of {hdr_len} bytes, shorter than BTF's 24"
            )));
        }
        let (type_off, type_len) = (field(8), field(12));
        let (str_off, str_len) = (field(16), field(20));
        let types_at = hdr_len
            .checked_add(type_off)
            .ok_or_else(|| err("type section offset overflows"))?;
        let strings_at = hdr_len
            .checked_add(str_off)
            .ok_or_else(|| err("string section offset overflows"))?;
        let types_end = types_at
            .checked_add(type_len)
            .filter(|&e| e <= data.len())
            .ok_or_else(|| err("type section past the end"))?;
        if !strings_at
            .checked_add(str_len)
            .is_some_and(|e| e <= data.len())
        {
            return Err(err("string section past the end"));
        }
        let (mut types, mut named) = (Vec::new(), Vec::new());
        let mut window = Window::new(&data, types_end);
        let mut at = types_at;
        while at < types_end {
            let cut = || err(format!("type {} cut short", types.len() + 1));
            let head = window.get(at, 12).ok_or_else(cut)?;
            let (name_off, info) = (le32(head, 0), le32(head, 1));
            let kind = (info >> 24) & 0x1f;
            let vlen = info & 0xffff;
            let trailing = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen as usize,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen as usize,
                0..=19 => 0,
                other => {
                    return Err(err(format!(
                        "type {} has kind {other}, unknown to this reader",
                        types.len() + 1
                    )))
                }
            };
            types.push(u32::try_from(at).map_err(|_| err("type section too large"))?);
            if matches!(kind, KIND_STRUCT | KIND_UNION | KIND_TYPEDEF) && name_off != 0 {
                named.push(Named {
                    id: types.len() as u32,
                    kind,
                    name_off,
                });
            }
            at += 12 + trailing;
        }
        if at != types_end {
            return Err(err("last type runs past the type section"));
        }
        Ok(Btf {
            data,
            strings_at,
            strings_len: str_len,
            types,
            named,
            found: Default::default(),
        })
    }

    /// Finds where each of `names` starts in the string section, in one pass over it: the
    /// lookups that follow need no pass of their own.
    pub fn prepare(&self, names: &[&str]) {
        let found = self.string_offsets(names);
        self.found.borrow_mut().extend(found);
    }

    /// Where `name` starts in the string section (once, in a deduplicated table).
    fn offsets_of(&self, name: &str) -> Vec<u32> {
        if let Some(v) = self.found.borrow().get(name) {
            return v.clone();
        }
        let found = self.string_offsets(&[name]);
        let v = found.get(name).cloned().unwrap_or_default();
        self.found.borrow_mut().insert(name.to_owned(), v.clone());
        v
    }

    /// The offsets in the string section at which each of `names` starts, in one pass.
    fn string_offsets(&self, names: &[&str]) -> std::collections::HashMap<String, Vec<u32>> {
        let mut found: std::collections::HashMap<String, Vec<u32>> = names
            .iter()
            .map(|n| ((*n).to_owned(), Vec::new()))
            .collect();
        let longest = names.iter().map(|n| n.len()).max().unwrap_or(0);
        let end = self.strings_at + self.strings_len;
        let mut window = Window::new(&self.data, end);
        // The string being read: where it starts, and its bytes so far (`None` once it is
        // longer than every name looked for).
        let mut start = 0usize;
        let mut current: Option<Vec<u8>> = Some(Vec::new());
        let mut at = self.strings_at;
        while at < end {
            let n = WINDOW_BYTES.min(end - at);
            let Some(chunk) = window.get(at, n) else {
                break;
            };
            for (i, &b) in chunk.iter().enumerate() {
                if b == 0 {
                    let hit = current
                        .as_deref()
                        .and_then(|c| std::str::from_utf8(c).ok())
                        .and_then(|c| found.get_mut(c));
                    if let (Some(offs), Ok(off)) = (hit, u32::try_from(start)) {
                        offs.push(off);
                    }
                    start = at + i + 1 - self.strings_at;
                    current = Some(current.take().map_or_else(Vec::new, |mut c| {
                        c.clear();
                        c
                    }));
                } else if let Some(c) = current.as_mut() {
                    if c.len() < longest {
                        c.push(b);
                    } else {
                        current = None;
                    }
                }
            }
            at += n;
        }
        found
    }

    /// The first type of `kind` named `name`.
    fn named(&self, kind: u32, name: &str) -> Option<u32> {
        let offs = self.offsets_of(name);
        self.named
            .iter()
            .find(|n| n.kind == kind && offs.contains(&n.name_off))
            .map(|n| n.id)
    }

    /// The string at `off` (up to 256 bytes, which every struct name fits).
    fn string(&self, off: u32) -> Option<String> {
        let off = off as usize;
        if off >= self.strings_len {
            return None;
        }
        let n = (self.strings_len - off).min(256);
        let mut buf = vec![0u8; n];
        self.data.read_at(self.strings_at + off, &mut buf)?;
        let len = buf.iter().position(|&b| b == 0)?;
        buf.truncate(len);
        String::from_utf8(buf).ok()
    }

    fn ty(&self, id: u32) -> Option<Type> {
        let at = *self.types.get((id as usize).checked_sub(1)?)? as usize;
        let mut b = [0u8; 12];
        self.data.read_at(at, &mut b)?;
        let info = le32(&b, 1);
        Some(Type {
            name_off: le32(&b, 0),
            kind: (info >> 24) & 0x1f,
            vlen: info & 0xffff,
            kind_flag: info >> 31 == 1,
            size_or_type: le32(&b, 2),
            extra: at + 12,
        })
    }

    /// The type behind typedefs, modifiers and type tags.
    fn resolve(&self, mut id: u32) -> Option<(u32, Type)> {
        for _ in 0..32 {
            let t = self.ty(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some((id, t)),
            }
        }
        None
    }

    /// The members of a struct or union: (name offset, type id, bit offset), read at once.
    fn members(&self, t: Type) -> Vec<(u32, u32, u32)> {
        let mut b = vec![0u8; 12 * t.vlen as usize];
        if self.data.read_at(t.extra, &mut b).is_none() {
            return Vec::new();
        }
        b.chunks_exact(12)
            .map(|m| {
                let off = le32(m, 2);
                let bits = if t.kind_flag { off & 0xff_ffff } else { off };
                (le32(m, 0), le32(m, 1), bits)
            })
            .collect()
    }

    /// A member of `struct name`: its byte offset and its type's size (8 for a pointer).
    /// Members of anonymous structs and unions inside it are found too.
    pub fn member(&self, strukt: &str, member: &str) -> Result<Member, BtfError> {
        let id = self
            .named(KIND_STRUCT, strukt)
            .ok_or_else(|| err(format!("no struct {strukt}")))?;
        // Anonymous members are searched depth-first: a budget of members looked at keeps a
        // hostile blob (anonymous members that point back at their struct) from hanging it.
        let mut budget = MEMBERS_LOOKED_AT_MAX;
        let names = self.offsets_of(member);
        self.find_member(id, &names, 0, 0, &mut budget)
            .ok_or_else(|| err(format!("struct {strukt} has no member {member}")))
    }

    fn find_member(
        &self,
        id: u32,
        member: &[u32],
        base_bits: u32,
        depth: u32,
        budget: &mut u32,
    ) -> Option<Member> {
        let (_, t) = self.resolve(id)?;
        if !matches!(t.kind, KIND_STRUCT | KIND_UNION) || depth > 8 {
            return None;
        }
        for (name, ty, bits) in self.members(t) {
            *budget = budget.checked_sub(1)?;
            let at = base_bits.checked_add(bits)?;
            if member.contains(&name) {
                if at % 8 != 0 {
                    return None;
                }
                let (_, mt) = self.resolve(ty)?;
                return Some(Member {
                    offset: at / 8,
                    size: self.size_of(mt),
                    pointer: mt.kind == KIND_PTR,
                });
            }
            if name == 0 {
                if let Some(m) = self.find_member(ty, member, at, depth + 1, budget) {
                    return Some(m);
                }
            }
        }
        None
    }

    fn size_of(&self, t: Type) -> u32 {
        match t.kind {
            KIND_PTR => 8,
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 => t.size_or_type,
            _ => 0,
        }
    }

    fn params(&self, proto: Type) -> Vec<Param> {
        (0..proto.vlen as usize)
            .map(|i| {
                let ty = self.data.u32_at(proto.extra + 8 * i + 4).unwrap_or(0);
                match self.resolve(ty) {
                    Some((_, t)) if t.kind == KIND_PTR => {
                        let pointee = self
                            .resolve(t.size_or_type)
                            .filter(|(_, p)| matches!(p.kind, KIND_STRUCT | KIND_UNION))
                            .and_then(|(_, p)| self.string(p.name_off));
                        Param::Pointer(pointee)
                    }
                    Some((_, t)) => Param::Value(self.size_of(t)),
                    None => Param::Value(0),
                }
            })
            .collect()
    }

    /// The parameters of the raw tracepoint `name` (from its `btf_trace_<name>` typedef, a
    /// pointer to a function whose first parameter is the tracepoint's private data): for each,
    /// the struct it points to (`Some("task_struct")`), or its size when it is no pointer.
    pub fn tracepoint_params(&self, name: &str) -> Result<Vec<Param>, BtfError> {
        let typedef = format!("btf_trace_{name}");
        let id = self
            .named(KIND_TYPEDEF, &typedef)
            .ok_or_else(|| err(format!("no tracepoint {name} ({typedef})")))?;
        let bad = || err(format!("{typedef} is not a pointer to a function"));
        let (_, ptr) = self.resolve(id).ok_or_else(bad)?;
        if ptr.kind != KIND_PTR {
            return Err(bad());
        }
        let (_, proto) = self.resolve(ptr.size_or_type).ok_or_else(bad)?;
        if proto.kind != KIND_FUNC_PROTO {
            return Err(bad());
        }
        let mut params = self.params(proto);
        // The first is the tracepoint's private data, not an argument.
        if params.is_empty() {
            return Err(bad());
        }
        params.remove(0);
        Ok(params)
    }
}

/// Where a struct member lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub offset: u32,
    pub size: u32,
    pub pointer: bool,
}

/// A raw tracepoint's parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Param {
    /// A pointer, with the name of the struct it points to when it does.
    Pointer(Option<String>),
    /// Anything else, by size in bytes.
    Value(u32),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal BTF blob: `struct s { int a; struct { long b; }; char *c; }` and a typedef
    /// `btf_trace_t` of a pointer to `void (void *, struct s *, long)`.
    fn blob() -> Vec<u8> {
        let strings = b"\0s\0a\0b\0c\0int\0long\0char\0btf_trace_t\0";
        let off = |name: &str| {
            let mut at = 0;
            for part in strings.split(|&b| b == 0) {
                if part == name.as_bytes() {
                    return at as u32;
                }
                at += part.len() + 1;
            }
            panic!("{name}")
        };
        let mut t: Vec<u32> = Vec::new();
        let info = |kind: u32, vlen: u32, flag: u32| (flag << 31) | (kind << 24) | vlen;
        // 1: int (4 bytes)
        t.extend([off("int"), info(KIND_INT, 0, 0), 4, 32]);
        // 2: long (8 bytes)
        t.extend([off("long"), info(KIND_INT, 0, 0), 8, 64]);
        // 3: char
        t.extend([off("char"), info(KIND_INT, 0, 0), 1, 8]);
        // 4: char *
        t.extend([0, info(KIND_PTR, 0, 0), 3]);
        // 5: anonymous struct { long b; } at bit 0
        t.extend([0, info(KIND_STRUCT, 1, 0), 8, off("b"), 2, 0]);
        // 6: struct s { int a @0; anon @64; char *c @128 }
        t.extend([off("s"), info(KIND_STRUCT, 3, 0), 24]);
        t.extend([off("a"), 1, 0, 0, 5, 64, off("c"), 4, 128]);
        // 7: struct s *
        t.extend([0, info(KIND_PTR, 0, 0), 6]);
        // 8: void *
        t.extend([0, info(KIND_PTR, 0, 0), 0]);
        // 9: proto (void *, struct s *, long)
        t.extend([0, info(KIND_FUNC_PROTO, 3, 0), 0, 0, 8, 0, 7, 0, 2]);
        // 10: pointer to the proto, 11: the typedef
        t.extend([0, info(KIND_PTR, 0, 0), 9]);
        t.extend([off("btf_trace_t"), info(KIND_TYPEDEF, 0, 0), 10]);
        wrap(&t, strings)
    }

    /// A BTF blob of these type words and this string table.
    fn wrap(types: &[u32], strings: &[u8]) -> Vec<u8> {
        let types: Vec<u8> = types.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut out = Vec::new();
        out.extend(MAGIC.to_le_bytes());
        out.extend([1u8, 0]);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend(w.to_le_bytes());
        }
        out.extend(types);
        out.extend(strings);
        out
    }

    #[test]
    fn members_are_found_through_anonymous_structs() {
        let btf = Btf::parse(blob()).expect("parses");
        assert_eq!(
            btf.member("s", "a").expect("a"),
            Member {
                offset: 0,
                size: 4,
                pointer: false
            }
        );
        assert_eq!(
            btf.member("s", "b").expect("b"),
            Member {
                offset: 8,
                size: 8,
                pointer: false
            }
        );
        assert_eq!(
            btf.member("s", "c").expect("c"),
            Member {
                offset: 16,
                size: 8,
                pointer: true
            }
        );
        assert!(btf.member("s", "d").is_err());
        assert!(btf.member("t", "a").is_err());
    }

    #[test]
    fn tracepoint_parameters_leave_out_the_private_data() {
        let btf = Btf::parse(blob()).expect("parses");
        assert_eq!(
            btf.tracepoint_params("t").expect("t"),
            vec![Param::Pointer(Some("s".to_owned())), Param::Value(8)]
        );
        assert!(btf.tracepoint_params("u").is_err());
    }

    /// A struct whose thousand anonymous members are the struct itself: a search for a member
    /// it lacks stops at the budget instead of walking 1000^8 paths.
    #[test]
    fn a_struct_made_of_itself_is_searched_within_a_budget() {
        let strings = b"\0loop\0";
        let n = 1_000u32;
        let mut t: Vec<u32> = vec![1, (KIND_STRUCT << 24) | n, 8];
        for _ in 0..n {
            t.extend([0, 1, 0]);
        }
        let btf = Btf::parse(wrap(&t, strings)).expect("parses");
        assert!(btf.member("loop", "absent").is_err());
    }

    #[test]
    fn a_damaged_blob_is_an_error_never_a_panic() {
        let good = blob();
        assert!(Btf::parse(Vec::new()).is_err());
        let mut bad_magic = good.clone();
        bad_magic[0] = 0;
        assert!(Btf::parse(bad_magic).is_err());
        // Every cut is an error or a parse that answers without panicking.
        for len in 0..good.len() {
            if let Ok(btf) = Btf::parse(good[..len].to_vec()) {
                let _ = btf.member("s", "c");
                let _ = btf.tracepoint_params("t");
            }
        }
        // Every single-byte change likewise.
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0xff;
            if let Ok(btf) = Btf::parse(b) {
                let _ = btf.member("s", "c");
                let _ = btf.tracepoint_params("t");
            }
        }
    }

    #[test]
    fn the_running_kernel_names_what_the_trace_reads() {
        let path = std::path::Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            eprintln!("SKIPPED: no /sys/kernel/btf/vmlinux on this host");
            return;
        }
        let btf = Btf::open(path).expect("the kernel's BTF parses");
        // The same read whole, in memory, says the same.
        let whole = Btf::parse(std::fs::read(path).expect("read")).expect("parses");
        for (s, m) in [
            ("task_struct", "cgroups"),
            ("kernfs_node", "id"),
            ("cgroup", "kn"),
        ] {
            assert_eq!(btf.member(s, m), whole.member(s, m));
        }
        let cgroups = btf
            .member("task_struct", "cgroups")
            .expect("task_struct.cgroups");
        assert!(cgroups.pointer);
        let id = btf.member("kernfs_node", "id").expect("kernfs_node.id");
        assert_eq!(id.size, 8);
        let params = btf
            .tracepoint_params("sched_stat_runtime")
            .expect("sched_stat_runtime");
        assert_eq!(params[0], Param::Pointer(Some("task_struct".to_owned())));
        assert_eq!(params[1], Param::Value(8));
    }
}
