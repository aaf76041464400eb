//! The configuration file's schema, in two layers. [`raw`]: the file as written, through serde,
//! one struct per section, every value kept as written. Then validation: a [`Validator`] takes the raw [`Field`]s of one
//! section, checks each against its bounds and records a [`Problem`] with file, line and key
//! for each bad one (the line found from the key in the text). The sections themselves are validated beside the components that own them
//! (`SpoolSection::read` in the spool, `GpuConfig::read` in gpu, ...), and `config` assembles
//! them. This module depends on nothing of the crate, so every owner can use it without a cycle.

use std::fmt;
use std::ops::Range;

pub mod raw;

use raw::{Field, Section, Unknown};

/// One problem in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    /// 1-based; 0 when the problem is the whole file's.
    pub line: usize,
    /// `section.key`, or the section; empty for the whole file.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}:{}: {}", self.file, self.line, self.message)
        } else {
            write!(
                f,
                "{}:{}: {}: {}",
                self.file, self.line, self.key, self.message
            )
        }
    }
}

/// Collects every problem of one file, each with the line of its key.
#[derive(Debug)]
pub struct Validator<'a> {
    file: &'a str,
    text: &'a str,
    /// The text as a document, parsed at the first problem (to find its line).
    doc: Option<toml_edit::ImDocument<&'a str>>,
    /// Where the text's newlines are, found at the first problem (a file of many problems is
    /// not scanned once per problem).
    newlines: std::cell::OnceCell<Vec<usize>>,
    problems: Vec<Problem>,
}

impl<'a> Validator<'a> {
    pub fn new(file: &'a str, text: &'a str) -> Self {
        Validator {
            file,
            text,
            doc: None,
            newlines: std::cell::OnceCell::new(),
            problems: Vec::new(),
        }
    }

    /// Every problem recorded, in the order of their lines.
    pub fn into_problems(mut self) -> Vec<Problem> {
        self.problems.sort_by_key(|p| p.line);
        self.problems
    }

    /// The 1-based line where `span` starts; 0 for none.
    fn line_of(&self, span: Option<Range<usize>>) -> usize {
        span.map_or(0, |s| {
            let newlines = self.newlines.get_or_init(|| {
                let bytes = self.text.as_bytes();
                (0..bytes.len()).filter(|&i| bytes[i] == b'\n').collect()
            });
            newlines.partition_point(|&at| at < s.start) + 1
        })
    }

    /// Where `key` (`section`, `section.key`, or a key of a section given as a path) is written:
    /// its value, else its name; entry `item` of an array value.
    fn span_of(&mut self, path: &[&str], item: Option<usize>) -> Option<Range<usize>> {
        if self.doc.is_none() {
            self.doc = toml_edit::ImDocument::parse(self.text).ok();
        }
        let doc = self.doc.as_ref()?;
        let (last, parents) = path.split_last()?;
        let mut table: &dyn toml_edit::TableLike = doc.as_table();
        for p in parents {
            table = table.get(p)?.as_table_like()?;
        }
        let (k, v) = table.get_key_value(last)?;
        let entry = item.and_then(|i| v.as_array()?.get(i)?.span());
        entry.or_else(|| v.span()).or_else(|| k.span())
    }

    fn push(&mut self, line: usize, key: &str, msg: String) {
        self.problems.push(Problem {
            file: self.file.to_owned(),
            line,
            key: key.to_owned(),
            message: msg,
        });
    }

    /// Records a problem of `key` (`section.key`, or a section), on the line it is written (a
    /// key that is not written: its section's).
    pub fn problem(&mut self, key: &str, msg: impl Into<String>) {
        let span = match key.split_once('.') {
            Some((section, k)) => self
                .span_of(&[section, k], None)
                .or_else(|| self.span_of(&[section], None)),
            None if key.is_empty() => None,
            None => self.span_of(&[key], None),
        };
        let line = self.line_of(span);
        self.push(line, key, msg.into());
    }

    /// Records a problem of entry `item` of the array `key` (`section.key`).
    pub fn problem_in(&mut self, key: &str, item: usize, msg: impl Into<String>) {
        let span = key
            .split_once('.')
            .and_then(|(section, k)| self.span_of(&[section, k], Some(item)));
        let line = self.line_of(span);
        self.push(line, key, msg.into());
    }

    /// Records a problem at a span of the text (a syntax error), or of the whole file (`None`).
    pub fn problem_at(&mut self, span: Option<Range<usize>>, msg: impl Into<String>) {
        let line = self.line_of(span);
        self.push(line, "", msg.into());
    }

    /// The keys of section `name` when it is a table; a problem for anything else under that
    /// name, and for each key outside the contract.
    pub fn section<'s, T: Unknown>(&mut self, name: &str, s: &'s Section<T>) -> Option<&'s T> {
        match s {
            Section::Absent => None,
            Section::NotATable => {
                self.problem(name, format!("must be a table, like [{name}]"));
                None
            }
            Section::Table(keys) => {
                for key in keys.unknown().keys() {
                    let span = self.span_of(&[name, key], None);
                    let line = self.line_of(span);
                    self.push(
                        line,
                        &format!("{name}.{key}"),
                        format!("unknown key (known: {})", T::KEYS.join(", ")),
                    );
                }
                Some(keys)
            }
        }
    }

    /// Records an unknown top-level section.
    pub fn unknown_section(&mut self, name: &str, known: &[&str]) {
        let span = self.span_of(&[name], None);
        let line = self.line_of(span);
        self.push(
            line,
            name,
            format!("unknown section (known: {})", known.join(", ")),
        );
    }

    /// A value of the key's type, or a problem saying what it must be.
    fn typed<'f, T>(&mut self, f: &'f Field<T>, key: &str, must: &str) -> Option<&'f T> {
        match f {
            Field::Absent => None,
            Field::Given(Ok(v)) => Some(v),
            Field::Given(Err(_)) => {
                self.problem(key, must);
                None
            }
        }
    }

    /// A non-empty string without NUL.
    pub fn string(&mut self, f: &Field<String>, key: &str) -> Option<String> {
        let s = self.typed(f, key, "must be a string")?;
        if s.is_empty() || s.contains('\0') {
            self.problem(key, "must not be empty or contain NUL");
            return None;
        }
        Some(s.clone())
    }

    /// An integer within `lo ..= hi`.
    pub fn int(&mut self, f: &Field<i64>, key: &str, lo: i64, hi: i64) -> Option<u64> {
        let i = *self.typed(f, key, "must be an integer")?;
        if !(lo..=hi).contains(&i) {
            self.problem(key, format!("{i} is out of range {lo} ..= {hi}"));
            return None;
        }
        u64::try_from(i).ok()
    }

    /// A finite number (an integer is taken too) within `lo ..= hi`.
    pub fn float(&mut self, f: &Field<f64>, key: &str, lo: f64, hi: f64) -> Option<f64> {
        let x = *self.typed(f, key, "must be a number")?;
        if !x.is_finite() || !(lo..=hi).contains(&x) {
            self.problem(key, format!("{x} is out of range {lo} ..= {hi}"));
            return None;
        }
        Some(x)
    }

    pub fn bool(&mut self, f: &Field<bool>, key: &str) -> Option<bool> {
        self.typed(f, key, "must be true or false").copied()
    }

    /// One of `options`, by name.
    pub fn choice<T: Copy>(
        &mut self,
        f: &Field<String>,
        key: &str,
        options: &[(&str, T)],
    ) -> Option<T> {
        let s = self.string(f, key)?;
        match options.iter().find(|(n, _)| *n == s) {
            Some((_, v)) => Some(*v),
            None => {
                let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                self.problem(key, format!("{s:?} is not one of {}", names.join(", ")));
                None
            }
        }
    }

    /// An array as written (each entry checked by the caller, its problems named with
    /// [`problem_in`](Self::problem_in)).
    pub fn array<'f>(
        &mut self,
        f: &'f Field<Vec<toml::Value>>,
        key: &str,
        must: &str,
    ) -> Option<&'f Vec<toml::Value>> {
        self.typed(f, key, must)
    }

    /// An array of user or group ids.
    pub fn ids(&mut self, f: &Field<Vec<toml::Value>>, key: &str) -> Option<Vec<u32>> {
        let arr = self.typed(f, key, "must be an array of integers")?;
        let mut out = Vec::with_capacity(arr.len());
        for (i, item) in arr.iter().enumerate() {
            match item.as_integer().and_then(|i| u32::try_from(i).ok()) {
                Some(id) => out.push(id),
                None => self.problem_in(key, i, "every entry must be an id from 0 to 4294967295"),
            }
        }
        Some(out)
    }

    /// An array of strings, each checked by `each` (given the entry's index, and which names
    /// its own problems).
    pub fn strings(
        &mut self,
        f: &Field<Vec<toml::Value>>,
        key: &str,
        mut each: impl FnMut(&mut Self, usize, &str) -> bool,
    ) -> Option<Vec<String>> {
        let arr = self.typed(f, key, "must be an array of strings")?;
        let mut out = Vec::with_capacity(arr.len());
        for (i, item) in arr.iter().enumerate() {
            match item.as_str() {
                Some(s) => {
                    if each(self, i, s) {
                        out.push(s.to_owned());
                    }
                }
                None => self.problem_in(key, i, "every entry must be a string"),
            }
        }
        Some(out)
    }
}
