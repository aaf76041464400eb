//! What the contract accepts as a run id and a domain, checked by every side with this one code:
//! the agent's run tracker and control socket (through `wattd-collectors`) before a name enters a
//! record, and the ledger before it stores one. A name that passes holds no control character,
//! no space and no separator of the text tables, so it cannot forge a line anywhere.

/// The longest run id.
pub const RUN_ID_MAX_BYTES: usize = 128;

/// The energy domains a record may carry.
pub const DOMAINS: &[&str] = &[
    "package", "core", "uncore", "dram", "psys", "gpu", "platform",
];

/// Why `id` is not a valid run id: 1 to 128 bytes of `A-Z a-z 0-9 - _ . : @`, not `.` or `..`.
pub fn run_id_problem(id: &str) -> Option<&'static str> {
    if id.is_empty() {
        return Some("run id is empty");
    }
    if id.len() > RUN_ID_MAX_BYTES {
        return Some("run id is longer than 128 bytes");
    }
    if id == "." || id == ".." {
        return Some("run id is . or ..");
    }
    if !id
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':' | b'@'))
    {
        return Some("run id may hold only A-Z a-z 0-9 - _ . : @");
    }
    None
}

/// Most labels a run carries, and their key and value lengths: one bound for the control
/// socket, the tracker, the records and the ledger.
pub const LABELS_MAX: usize = 32;
pub const LABEL_KEY_MAX_BYTES: usize = 64;
pub const LABEL_VALUE_MAX_BYTES: usize = 256;

/// Why (`key`, `value`) is not a valid label: the key 1 to 64 bytes of `A-Z a-z 0-9 _ - . /`,
/// the value at most 256 bytes with no control character.
pub fn label_problem(key: &str, value: &str) -> Option<&'static str> {
    if key.is_empty() || key.len() > LABEL_KEY_MAX_BYTES {
        return Some("label key must be 1 to 64 bytes");
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'))
    {
        return Some("label key may hold only A-Z a-z 0-9 _ - . /");
    }
    if value.len() > LABEL_VALUE_MAX_BYTES {
        return Some("label value is longer than 256 bytes");
    }
    if value.chars().any(char::is_control) {
        return Some("label value holds a control character");
    }
    None
}

/// Why `domain` is not one of [`DOMAINS`].
pub fn domain_problem(domain: &str) -> Option<&'static str> {
    if DOMAINS.contains(&domain) {
        None
    } else {
        Some("domain is not one of package, core, uncore, dram, psys, gpu, platform")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_and_domains() {
        for ok in ["a", "run-1", "x.y:z@w_v", &"r".repeat(128)] {
            assert_eq!(run_id_problem(ok), None, "{ok}");
        }
        for bad in ["", ".", "..", "a b", "a\nb", "a/b", "é", &"r".repeat(129)] {
            assert!(run_id_problem(bad).is_some(), "{bad:?}");
        }
        assert_eq!(label_problem("account", "acme corp"), None);
        assert_eq!(label_problem("team/a.b-c_d", ""), None);
        for (k, v) in [
            ("", "v"),
            ("a b", "v"),
            ("k", "a\nb"),
            ("k", "a\tb"),
            (&"k".repeat(65), "v"),
            ("k", &"v".repeat(257)),
        ] {
            assert!(label_problem(k, v).is_some(), "{k:?} {v:?}");
        }
        assert_eq!(domain_problem("dram"), None);
        assert!(domain_problem("dram\n").is_some());
        assert!(domain_problem("").is_some());
    }
}
