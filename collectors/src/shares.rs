//! [`PackageShares`]: a quantity split across CPU packages, as a run's CPU time of one tick is.

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

#[cfg(test)]
mod tests {
    use super::*;

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
