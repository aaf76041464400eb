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

/// The parsed type section: where each type's record starts, by id (id 0 is void and has no
/// entry). A record is decoded when it is looked at, and names are found by a scan: the agent
/// looks up a dozen names once, at start, and the kernel's BTF has some 150,000 types (an index
/// of them would cost megabytes of memory for milliseconds of time).
pub struct Btf {
    data: Vec<u8>,
    strings_at: usize,
    strings_len: usize,
    types: Vec<u32>,
}

impl fmt::Debug for Btf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Btf")
            .field("types", &self.types.len())
            .finish()
    }
}

fn u32_at(d: &[u8], at: usize) -> Option<u32> {
    let b = d.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl Btf {
    pub fn parse(data: Vec<u8>) -> Result<Btf, BtfError> {
        let magic = data
            .get(0..2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| err("shorter than its header"))?;
        if magic != MAGIC {
            return Err(err(format!(
                "magic {magic:#06x}, not {MAGIC:#06x} (big-endian or not BTF)"
            )));
        }
        let field = |at: usize| u32_at(&data, at).ok_or_else(|| err("shorter than its header"));
        let hdr_len = field(4)? as usize;
        if hdr_len < 24 {
            return Err(err(format!(
                "header of {hdr_len} bytes, shorter than BTF's 24"
            )));
        }
        let (type_off, type_len) = (field(8)? as usize, field(12)? as usize);
        let (str_off, str_len) = (field(16)? as usize, field(20)? as usize);
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
        let mut types = Vec::new();
        let mut at = types_at;
        while at < types_end {
            let word = |i: usize| {
                u32_at(&data, at + 4 * i)
                    .filter(|_| at + 4 * i + 4 <= types_end)
                    .ok_or_else(|| err(format!("type {} cut short", types.len() + 1)))
            };
            // The name and size words are checked to be there; they are read when looked at.
            let (_, info, _) = (word(0)?, word(1)?, word(2)?);
            let kind = (info >> 24) & 0x1f;
            let vlen = info & 0xffff;
            let extra = at + 12;
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
            at = extra + trailing;
        }
        if at != types_end {
            return Err(err("last type runs past the type section"));
        }
        Ok(Btf {
            data,
            strings_at,
            strings_len: str_len,
            types,
        })
    }

    /// The first type of `kind` named `name`.
    fn named(&self, kind: u32, name: &str) -> Option<u32> {
        (1..=self.types.len() as u32).find(|&id| {
            self.ty(id)
                .is_some_and(|t| t.kind == kind && self.string(t.name_off) == Some(name))
        })
    }

    fn string(&self, off: u32) -> Option<&str> {
        if off as usize >= self.strings_len {
            return None;
        }
        let start = self.strings_at + off as usize;
        let end = self.strings_at + self.strings_len;
        let bytes = self.data.get(start..end)?;
        let len = bytes.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&bytes[..len]).ok()
    }

    fn ty(&self, id: u32) -> Option<Type> {
        let at = *self.types.get((id as usize).checked_sub(1)?)? as usize;
        let info = u32_at(&self.data, at + 4)?;
        Some(Type {
            name_off: u32_at(&self.data, at)?,
            kind: (info >> 24) & 0x1f,
            vlen: info & 0xffff,
            kind_flag: info >> 31 == 1,
            size_or_type: u32_at(&self.data, at + 8)?,
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

    /// The members of a struct or union: (name, type id, bit offset).
    fn members(&self, t: Type) -> impl Iterator<Item = (&str, u32, u32)> + '_ {
        let (extra, kind_flag) = (t.extra, t.kind_flag);
        (0..t.vlen as usize).filter_map(move |i| {
            let at = extra + 12 * i;
            let name = u32_at(&self.data, at)?;
            let ty = u32_at(&self.data, at + 4)?;
            let off = u32_at(&self.data, at + 8)?;
            let bits = if kind_flag { off & 0xff_ffff } else { off };
            Some((self.string(name).unwrap_or(""), ty, bits))
        })
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
        self.find_member(id, member, 0, 0, &mut budget)
            .ok_or_else(|| err(format!("struct {strukt} has no member {member}")))
    }

    fn find_member(
        &self,
        id: u32,
        member: &str,
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
            if name == member {
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
            if name.is_empty() {
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
                let ty = u32_at(&self.data, proto.extra + 8 * i + 4).unwrap_or(0);
                match self.resolve(ty) {
                    Some((_, t)) if t.kind == KIND_PTR => {
                        let pointee = self
                            .resolve(t.size_or_type)
                            .filter(|(_, p)| matches!(p.kind, KIND_STRUCT | KIND_UNION))
                            .and_then(|(_, p)| self.string(p.name_off));
                        Param::Pointer(pointee.map(str::to_owned))
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
        let Ok(data) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            eprintln!("SKIPPED: no /sys/kernel/btf/vmlinux on this host");
            return;
        };
        let btf = Btf::parse(data).expect("the kernel's BTF parses");
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
