//! The Prometheus text exposition format (0.0.4), written: one writer for the agent's and the
//! ledger's `/metrics`, with exact decimals for integer microjoules, the format's spellings of
//! the special floats, and escaped label values and help.

use std::fmt::{self, Write as _};

/// Integer microjoules shown as exact decimal joules.
#[derive(Clone, Copy, Debug)]
pub struct Joules(pub u128);

impl fmt::Display for Joules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / 1_000_000;
        let frac = self.0 % 1_000_000;
        if frac == 0 {
            return write!(f, "{whole}");
        }
        // Trailing zeros trimmed: 1500000 uJ is "1.5".
        let (mut frac, mut width) = (frac, 6usize);
        while frac % 10 == 0 {
            frac /= 10;
            width -= 1;
        }
        write!(f, "{whole}.{frac:0width$}")
    }
}

/// A float in the exposition format's spelling (`NaN`, `+Inf`, `-Inf`).
#[derive(Clone, Copy, Debug)]
pub struct Float(pub f64);

impl fmt::Display for Float {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        if v.is_nan() {
            f.write_str("NaN")
        } else if v.is_infinite() {
            f.write_str(if v > 0.0 { "+Inf" } else { "-Inf" })
        } else {
            // Rust's shortest round-trip representation; never an exponent, always parseable.
            write!(f, "{v}")
        }
    }
}

/// Appends a label value escaped for the text format: backslash, double quote and newline.
fn escape_label_value(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Appends HELP text escaped for the text format: backslash and newline.
fn escape_help(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Builds the exposition text: a family's HELP and TYPE, then its samples.
#[derive(Debug, Default)]
pub struct Writer {
    out: String,
}

impl Writer {
    /// A writer whose text starts with room for `n` bytes.
    pub fn with_capacity(n: usize) -> Self {
        Writer {
            out: String::with_capacity(n),
        }
    }

    /// The text written.
    pub fn finish(self) -> String {
        self.out
    }

    /// `# HELP` (escaped) and `# TYPE` of family `name`.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = write!(self.out, "# HELP {name} ");
        escape_help(&mut self.out, help);
        let _ = write!(self.out, "\n# TYPE {name} {kind}\n");
    }

    /// One sample of `name` with `labels` (values escaped).
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape_label_value(&mut self.out, v);
                self.out.push('"');
            }
            self.out.push('}');
        }
        // Writing to a String cannot fail.
        let _ = writeln!(self.out, " {value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joules_are_exact_decimals_of_microjoules() {
        let cases: [(u128, &str); 7] = [
            (0, "0"),
            (1, "0.000001"),
            (1_500_000, "1.5"),
            (12_000_345, "12.000345"),
            (3_000_000, "3"),
            (999_999, "0.999999"),
            // Beyond f64's 2^53: still exact in the text.
            (
                18_446_744_073_709_551_615_000_001,
                "18446744073709551615.000001",
            ),
        ];
        for (uj, want) in cases {
            assert_eq!(Joules(uj).to_string(), want, "{uj}");
        }
    }

    #[test]
    fn floats_use_the_exposition_spellings() {
        assert_eq!(Float(f64::NAN).to_string(), "NaN");
        assert_eq!(Float(f64::INFINITY).to_string(), "+Inf");
        assert_eq!(Float(f64::NEG_INFINITY).to_string(), "-Inf");
        assert_eq!(Float(0.25).to_string(), "0.25");
        assert_eq!(Float(10.0).to_string(), "10");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut w = Writer::with_capacity(0);
        w.sample("m", &[("a", "q\"b\\s\nn"), ("b", "plain")], 1u64);
        assert_eq!(w.out, "m{a=\"q\\\"b\\\\s\\nn\",b=\"plain\"} 1\n");
        let mut h = String::new();
        escape_help(&mut h, "a\\b\nc\"d");
        assert_eq!(h, "a\\\\b\\nc\"d");
    }
}
