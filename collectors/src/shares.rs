//! [`PackageShares`]: a quantity split across CPU packages, as a run's CPU time of one tick is;
//! and [`largest_remainder`], the one exact proportional split every part of the agent uses (a
//! run's CPU time over its packages, a removed child's residual over its claimants, a meter's
//! energy over the runs). It lives here, in the lowest crate, because the tracker needs it too.

/// A quantity per package (a run's CPU microseconds of one tick, split across the packages it
/// ran on): (package, value) pairs sorted by package, each package once. One small allocation:
/// a run is on one or two packages, and there are thousands of runs at every tick (a B-tree
/// map cost a 160-byte node a run a tick).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackageShares(Vec<(u32, u64)>);

impl PackageShares {
    /// The shares of `pairs` in any order; a package named twice gets the sum of its values
    /// (saturating).
    pub fn from_pairs(mut pairs: Vec<(u32, u64)>) -> Self {
        pairs.sort_unstable_by_key(|&(p, _)| p);
        pairs.dedup_by(|later, kept| {
            if later.0 == kept.0 {
                kept.1 = kept.1.saturating_add(later.1);
                true
            } else {
                false
            }
        });
        PackageShares(pairs)
    }

    /// The share of `package`, if it has one.
    pub fn get(&self, package: u32) -> Option<u64> {
        self.0
            .binary_search_by_key(&package, |&(p, _)| p)
            .ok()
            .map(|i| self.0[i].1)
    }

    /// (package, share), in package order.
    pub fn iter(&self) -> std::slice::Iter<'_, (u32, u64)> {
        self.0.iter()
    }

    /// The shares, in package order.
    pub fn values(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().map(|&(_, v)| v)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sets `package`'s share to `value` (a new package takes its place in order).
    pub fn insert(&mut self, package: u32, value: u64) {
        match self.0.binary_search_by_key(&package, |&(p, _)| p) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => self.0.insert(i, (package, value)),
        }
    }
}

/// As a map from package to share, as the `BTreeMap` it replaced was.
impl serde::Serialize for PackageShares {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(p, v)| (p, v)))
    }
}

impl FromIterator<(u32, u64)> for PackageShares {
    fn from_iter<I: IntoIterator<Item = (u32, u64)>>(iter: I) -> Self {
        PackageShares::from_pairs(iter.into_iter().collect())
    }
}

impl<const N: usize> From<[(u32, u64); N]> for PackageShares {
    fn from(pairs: [(u32, u64); N]) -> Self {
        PackageShares::from_pairs(pairs.to_vec())
    }
}

impl<'a> IntoIterator for &'a PackageShares {
    type Item = &'a (u32, u64);
    type IntoIter = std::slice::Iter<'a, (u32, u64)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Which of two equal remainders gets the spare unit (microjoule, microsecond) first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ties {
    /// The smaller key first (active energy).
    SmallestKey,
    /// The larger key first (idle energy). Opposite orders for the two parts keep runs with equal
    /// usage within 1 uJ of each other in total, not 2.
    LargestKey,
}

/// Splits `total` in proportion to `weights`, exactly: each share is the floor of its quota and
/// the remainder goes one unit at a time to the largest fractional parts, equal ones in `ties`
/// order of their keys. A zero weight never receives anything. Returns zeros when every weight is
/// zero (the caller decides where `total` goes).
pub fn apportion<K: Ord>(total: u64, weights: &[(K, u64)], ties: Ties) -> Vec<u64> {
    let w: Vec<u64> = weights.iter().map(|(_, w)| *w).collect();
    let mut out = Vec::with_capacity(w.len());
    largest_remainder(
        total,
        &w,
        |a, b| weights[a].0.cmp(&weights[b].0),
        ties,
        &mut out,
        &mut SplitScratch::default(),
    );
    out
}

/// Working buffers of [`largest_remainder`], kept by a caller that splits often (an interval's
/// meters over 10,000 runs: fresh buffers per split cost more in page faults than the
/// arithmetic; a run's CPU time over its packages, every run every tick).
#[derive(Debug, Default)]
pub struct SplitScratch {
    rems64: Vec<u64>,
    rems: Vec<u128>,
    select64: Vec<u64>,
    select: Vec<u128>,
    at_threshold: Vec<usize>,
}

/// The one largest-remainder split of the agent, on bare weights, into `out` (one share per
/// weight, in order): each share is the floor of its quota and what the floors leave goes one
/// unit at a time to the largest fractional parts, equal ones in `ties` order of `key_cmp(i, j)`.
/// The shares sum to `total` exactly unless every weight is zero (then all are zero: the caller
/// decides where `total` goes); a zero weight never receives anything. Written for the hot path
/// (10,000 runs x every meter x every interval): one division per weight, 64-bit where the
/// products fit, a linear selection of the threshold remainder, no sorting but of exact ties.
pub fn largest_remainder(
    total: u64,
    weights: &[u64],
    key_cmp: impl Fn(usize, usize) -> std::cmp::Ordering,
    ties: Ties,
    out: &mut Vec<u64>,
    scratch: &mut SplitScratch,
) {
    out.clear();
    // One weight (a run on a one-package host, a lone claimant): nothing to divide.
    if let [w] = weights {
        out.push(if *w > 0 { total } else { 0 });
        return;
    }
    let n = weights.len();
    let sum: u128 = weights.iter().map(|w| *w as u128).sum();
    if sum == 0 {
        out.resize(n, 0);
        return;
    }
    let max_w = weights.iter().copied().max().unwrap_or(0);
    let SplitScratch {
        rems64,
        rems,
        select64,
        select,
        at_threshold,
    } = scratch;
    rems64.clear();
    rems.clear();
    let wide = !(sum <= u64::MAX as u128 && total.checked_mul(max_w).is_some());
    let left = if !wide {
        // Every product fits in 64 bits: 64-bit division is several times cheaper.
        let sum64 = sum as u64;
        rems64.reserve(n);
        let mut given: u64 = 0;
        for &w in weights {
            let q = total * w;
            let share = q / sum64;
            given += share;
            out.push(share);
            rems64.push(q - share * sum64);
        }
        (total - given) as usize
    } else {
        rems.reserve(n);
        let mut given: u128 = 0;
        for &w in weights {
            let q = total as u128 * w as u128;
            let share = q / sum;
            given += share;
            out.push(share as u64);
            rems.push(q % sum);
        }
        (total as u128 - given) as usize
    };
    if left == 0 {
        return;
    }
    if wide {
        distribute(out, rems, select, at_threshold, left, &key_cmp, ties);
    } else {
        distribute(out, rems64, select64, at_threshold, left, &key_cmp, ties);
    }
}

/// Gives one more unit to each of the `left` largest remainders (equal ones in `ties` order of
/// their keys). `left` is always smaller than the number of non-zero remainders, so a zero
/// weight (remainder 0) never receives one.
fn distribute<R: Ord + Copy>(
    shares: &mut [u64],
    rems: &[R],
    values: &mut Vec<R>,
    at_threshold: &mut Vec<usize>,
    left: usize,
    key_cmp: &impl Fn(usize, usize) -> std::cmp::Ordering,
    ties: Ties,
) {
    // The `left`-th largest remainder is the threshold: everything above it gets one more, and
    // of those equal to it, as many as are still owed, chosen by key in `ties` order (so list
    // order does not matter). Selecting on bare remainders keeps this linear and cheap.
    values.clear();
    values.extend_from_slice(rems);
    let (_, threshold, _) = values.select_nth_unstable_by(left - 1, |a, b| b.cmp(a));
    let threshold = *threshold;
    let mut given = 0usize;
    at_threshold.clear();
    for (i, &r) in rems.iter().enumerate() {
        if r > threshold {
            shares[i] += 1;
            given += 1;
        } else if r == threshold {
            at_threshold.push(i);
        }
    }
    let owed = left - given;
    at_threshold.sort_unstable_by(|a, b| match ties {
        Ties::SmallestKey => key_cmp(*a, *b),
        Ties::LargestKey => key_cmp(*b, *a),
    });
    for &i in at_threshold.iter().take(owed) {
        shares[i] += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_remainder_is_exact_and_breaks_ties_by_key() {
        let (mut out, mut s) = (Vec::new(), SplitScratch::default());
        let mut split = |total, w: &[u64], ties| {
            largest_remainder(total, w, |a, b| a.cmp(&b), ties, &mut out, &mut s);
            out.clone()
        };
        assert_eq!(split(10, &[1, 1, 1], Ties::SmallestKey), [4, 3, 3]);
        assert_eq!(split(10, &[1, 1, 1], Ties::LargestKey), [3, 3, 4]);
        assert_eq!(split(10, &[1, 0, 2], Ties::SmallestKey), [3, 0, 7]);
        // One weight takes everything, unless it is zero; no weight at all gives nothing.
        assert_eq!(split(10, &[7], Ties::SmallestKey), [10]);
        assert_eq!(split(10, &[0], Ties::SmallestKey), [0]);
        assert_eq!(split(10, &[0, 0], Ties::SmallestKey), [0, 0]);
        assert!(split(10, &[], Ties::SmallestKey).is_empty());
        // Products past 64 bits take the 128-bit path, still exact.
        let wide = split(u64::MAX, &[u64::MAX, 1, 3], Ties::SmallestKey);
        assert_eq!(
            wide.iter().map(|&v| u128::from(v)).sum::<u128>(),
            u128::from(u64::MAX)
        );
    }

    #[test]
    fn pairs_are_sorted_and_a_package_named_twice_is_summed() {
        let s = PackageShares::from_pairs(vec![(3, 5), (1, 2), (3, 7), (0, 0)]);
        assert_eq!(
            s.iter().copied().collect::<Vec<_>>(),
            [(0, 0), (1, 2), (3, 12)]
        );
        assert_eq!(s.get(3), Some(12));
        assert_eq!(s.get(2), None);
        assert_eq!(s.values().sum::<u64>(), 14);
        let mut t = PackageShares::from([(1, 9)]);
        t.insert(1, 1);
        t.insert(0, 4);
        assert_eq!(t, PackageShares::from([(0, 4), (1, 1)]));
        let summed = PackageShares::from_pairs(vec![(2, u64::MAX), (2, 1)]);
        assert_eq!(summed.get(2), Some(u64::MAX));
        assert_eq!(t.len(), 2);
        assert!(PackageShares::default().is_empty());
    }
}
